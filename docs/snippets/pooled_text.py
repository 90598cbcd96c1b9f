# How much of a concept reaches the model through the pooled text vector, on the tiny offline SDXL pipeline.
# Run by tests/test_docs.py.
import diffusers_unlearn as du

# --8<-- [start:routes]
pipe = du.attach(du.testing.tiny_sdxl_pipeline(seed=0))   # SDXL, SD3 or Flux: SD 1.x / 2.x have no pooled vector
for route in du.analysis.conditioning_routes(pipe, "a painting in van gogh style", ["a painting in monet style"]):
    print(route)   # pooled near 1 with tokens near 0: no K/V edit can remove what sets the two apart
# --8<-- [end:routes]
