# The code of "The saved folder's format", on the tiny offline pipeline. Run by tests/test_docs.py from a temporary
# folder.
import diffusers_unlearn as du

pipe = du.attach(du.testing.tiny_pipeline(seed=0))
pipe.unlearn("van gogh", domain="style", seed=0)
pipe.unlearn("picasso", domain="style", seed=0)

# --8<-- [start:save]
pipe.save_unlearned("out/", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
# --8<-- [end:save]

# --8<-- [start:load]
pipe = du.UnlearnStableDiffusionPipeline.from_pretrained("out/")     # or a Hub id: unlearning/ is fetched too
with pipe.audit("r0002"): ...                    # only that request
with pipe.audit("r0002", mode="without"): ...    # all but it
pipe.rollback("r0001")   # re-folds the base with the remaining requests (logged at INFO)
pipe.unfold()            # the requests stacked as one peft adapter on the true base
# --8<-- [end:load]
assert pipe.removed_concepts == ["picasso"] and pipe.unlearning_mode == "stacked"
