# The code of the "Methods and regularizers" page, on the tiny offline pipeline. Run by tests/test_docs.py.
import diffusers_unlearn as du

pipe = du.attach(du.testing.tiny_pipeline(seed=0))

# --8<-- [start:ca]
# a retain loss: the kept concepts, in the request's own prompts, trained toward the frozen model on the same x_t
pipe.unlearn("cat", method="ca", anchor="dog", domain="object", keep=["bird", "horse"], keep_weight=1.0,
             steps=4, sampling_steps=4)   # a few steps for the tiny model; on yours leave both at their defaults
# --8<-- [end:ca]

# --8<-- [start:regularized]
rec = pipe.unlearn("van gogh", method="esd", domain="style", seed=0, steps=4, sampling_steps=4,
                   regularizers=[du.GradientProjection(keep=["monet"]), du.L2Drift(weight=1e3)])
# --8<-- [end:regularized]
assert pipe.removed_concepts == ["cat", "van gogh"] and rec.steps == 4
