"""Shared by the deployment tests: fresh-process runs and a plain-diffusers check script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import PROMPT, generate

# Run first in a fresh process: makes ``import diffusers_unlearn`` fail, so whatever the script does works with
# plain diffusers alone (as on a machine without this package).
BLOCK_PACKAGE = "import sys; sys.modules['diffusers_unlearn'] = None\n"

PLAIN_CHECK = """
import torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline

def images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe({prompt!r}, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt",
                **{call_kwargs!r}).images

expected = torch.load({expected!r})
saved = DiffusionPipeline.from_pretrained({saved!r})
assert type(saved).__name__ == {class_name!r}, type(saved).__name__
diff = (images(saved) - expected["folded"]).abs().max().item()
# Another process may pick other float32 kernels (seen: 1.07e-06 on one machine); images lie in [0, 1], so 1e-5 is
# float32 rounding over the few sampling steps, far below one 8-bit level (3.9e-3).
assert diff < 1e-5, ("saved folder", diff)
for request_id, own in expected["only"].items():
    base = DiffusionPipeline.from_pretrained({base!r})
    base.load_lora_weights({saved!r} + "/unlearning/lora", weight_name=request_id + ".safetensors")
    diff = (images(base) - own).abs().max().item()
    assert diff < 1e-4, (request_id, diff)
    print("LORA", request_id, diff)
print("PLAIN DIFFUSERS OK")
"""


def run_python(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


def check_with_plain_diffusers(tmp_path: Path, pipe, saved: Path, base_pipe, class_name: str,
                               call_kwargs: dict | None = None) -> str:
    """In a fresh process without this package: the saved folder loads and gives ``pipe``'s folded images (within
    float32 rounding, 1e-5), and each exported LoRA on ``base_pipe`` (saved under ``tmp_path``) gives that request's
    own images (the request alone on the base, as ``pipe.audit`` shows it) within 1e-4. ``call_kwargs`` go to every
    pipeline call (e.g. an image size the loaded pipeline would not default to). Returns stdout."""
    call_kwargs = dict(call_kwargs or {})
    import torch

    only = {}
    for request_id in pipe.unlearning_ledger.ids():
        with pipe.audit(request_id):  # the request's own adapter, stacked on the base
            only[request_id] = generate(pipe, **call_kwargs)
    pipe.fold()
    try:
        folded = generate(pipe, **call_kwargs)
    finally:
        pipe.unfold()
    base = tmp_path / "base"
    base_pipe.save_pretrained(base)
    torch.save({"folded": folded, "only": only}, tmp_path / "expected.pt")
    script = BLOCK_PACKAGE + PLAIN_CHECK.format(
        prompt=PROMPT, expected=str(tmp_path / "expected.pt"), saved=str(saved), base=str(base), class_name=class_name,
        call_kwargs=call_kwargs,
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PLAIN DIFFUSERS OK" in result.stdout
    return result.stdout
