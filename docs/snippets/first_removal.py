# The first removal, on the tiny offline pipeline; on your checkpoint replace the first line (see the page).
# Run by tests/test_docs.py from a temporary folder.
# --8<-- [start:removal]
import diffusers_unlearn as du

pipe = du.attach(du.testing.tiny_pipeline(seed=0))  # your pipeline: du.attach(StableDiffusionPipeline.from_pretrained(...))
record = pipe.unlearn("van gogh", domain="style", seed=0)   # the recommended default: the closed-form solve
print(record.request_id, record.concept, record.method, f"{record.seconds:.1f}s")
print(pipe.removed_concepts)                                 # ['van gogh']
pipe.save_unlearning("removals/")                            # ledger.json + one adapter per request, atomically
# --8<-- [end:removal]

# --8<-- [start:trained]
record = pipe.unlearn("monet", method="esd", domain="style", seed=0, steps=6, sampling_steps=4,
                      regularizers=[du.GradientProjection(keep=["picasso"]), du.L2Drift(weight=1e3)])
print(record.method, record.steps, f"final loss {record.final_loss:.4g}")
# --8<-- [end:trained]

# --8<-- [start:reload]
fresh = du.attach(du.testing.tiny_pipeline(seed=0))          # the same base, e.g. in another process
fresh.load_unlearning("removals/")                          # refuses another base, naming both fingerprints
assert fresh.removed_concepts == ["van gogh"]
# --8<-- [end:reload]
