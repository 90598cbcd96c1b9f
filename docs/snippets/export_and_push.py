# Export, model card and a Hub push (dry run), on the tiny offline pipeline. Run by tests/test_docs.py.
import diffusers_unlearn as du

pipe = du.attach(du.testing.tiny_pipeline(seed=0))
pipe.set_progress_bar_config(disable=True)
record = pipe.unlearn("van gogh", domain="style", seed=0)

# --8<-- [start:save]
folder = pipe.save_unlearned("out/")                 # a plain diffusers folder: folded weights, ledger, LoRAs, card
from diffusers import DiffusionPipeline

plain = DiffusionPipeline.from_pretrained("out/")    # no diffusers-unlearn needed to load it
# --8<-- [end:save]

# --8<-- [start:lora]
export = pipe.export_lora(record.request_id, "loras/")   # loras/<id>.safetensors, relative to the BASE model
base = du.testing.tiny_pipeline(seed=0)                  # plain diffusers pipeline of the same base
base.load_lora_weights("loras/", weight_name=f"{record.request_id}.safetensors")
# --8<-- [end:lora]

# --8<-- [start:card]
card = pipe.unlearned_model_card(base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
print(card.data.removed_concepts)                    # ['van gogh']
print(card.content[:400])
# --8<-- [end:card]
