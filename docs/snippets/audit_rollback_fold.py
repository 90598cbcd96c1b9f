# Audit, rollback and fold on the tiny offline pipeline. Run by tests/test_docs.py from a temporary folder.
import diffusers_unlearn as du

pipe = du.attach(du.testing.tiny_pipeline(seed=0))
pipe.set_progress_bar_config(disable=True)
# --8<-- [start:audit]
first = pipe.unlearn("van gogh", domain="style", seed=0)
second = pipe.unlearn("picasso", domain="style", seed=0)

with pipe.audit(first.request_id):                   # only that request's adapter is active
    only_first = pipe("a cat in van gogh style", num_inference_steps=3, output_type="pt").images
with pipe.audit(first.request_id, mode="without"):   # every request but that one
    without_first = pipe("a cat in van gogh style", num_inference_steps=3, output_type="pt").images
grid = pipe.audit_grid(first.request_id, "a cat in van gogh style", num_inference_steps=3)
grid.save("audit.png")                               # base / all requests / only it / all but it
# --8<-- [end:audit]

# --8<-- [start:rollback]
pipe.rollback(first.request_id)                      # drop one request, keep the rest
assert pipe.removed_concepts == ["picasso"]
# --8<-- [end:rollback]

# --8<-- [start:fold]
pipe.fold()                                          # bake the active requests into the K/V weights
print(pipe.unlearning_mode)                          # 'folded': base inference speed
pipe.unfold()                                        # stacked again on the true base weights
# --8<-- [end:fold]
