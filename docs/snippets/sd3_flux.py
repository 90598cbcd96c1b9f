# The code of the "SD3 and Flux" page, on the tiny offline Flux pipeline. Run by tests/test_docs.py from a
# temporary folder. On a real model BASE is its Hub id and FluxPipeline.from_pretrained(BASE) the base pipeline.
import diffusers_unlearn as du
from diffusers import DiffusionPipeline

# --8<-- [start:flux]
pipe = du.attach(du.testing.tiny_flux_pipeline(seed=0))       # offline, real classes, 16x16 images
rec = pipe.unlearn("van gogh", domain="style", seed=0, steps=4, sampling_steps=4,   # ESD, SD3's and Flux's default
                   regularizers=[du.GradientProjection(keep=["monet"], neighbors=0)])  # 0: only what is named
pipe.save_unlearned("out/")                                    # transformer/ holds the folded weights
plain = DiffusionPipeline.from_pretrained("out/")              # FluxPipeline, no diffusers-unlearn needed
base = du.testing.tiny_flux_pipeline(seed=0)                   # a plain FluxPipeline of the same base
base.load_lora_weights("out/unlearning/lora", weight_name=f"{rec.request_id}.safetensors")  # "transformer." keys
# --8<-- [end:flux]
assert type(plain).__name__ == "FluxPipeline" and rec.method == "esd"
