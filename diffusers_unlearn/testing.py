"""Tiny, real, offline pipelines for tests, examples and CPU benchmarks (``du.testing``).

The components are the real diffusers/transformers classes at toy sizes and random weights, built in code without a
download; they live in ``tiny``, which the package's own modules use, so no module of the package imports this one.
"""

from .families.tiny import (  # noqa: F401
    SD1_DDIM_CONFIG,
    TINY_MAX_LENGTH,
    TINY_WORDS,
    _tiny_vae,
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
)

__all__ = ["tiny_pipeline", "tiny_sdxl_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline", "TINY_WORDS",
           "TINY_MAX_LENGTH", "SD1_DDIM_CONFIG"]
