"""An evaluation's images split across processes with accelerate, and put back together in order.

Every image depends only on its prompt and its own seed (``images.generate_images``), never on the process that
draws it. The images are cut into the batches one process would draw (``batch_size`` consecutive cases), the
batches are shared out with ``PartialState.split_between_processes``, each process draws and classifies its own,
and ``accelerate.utils.gather_object`` hands every process all of them in batch order. A batch is the same pipeline
call and the same classifier call whichever process runs it, so with the same threads per process the images and
the scores equal one process's exactly; one process runs the same batches itself.

Launch a script that evaluates with ``accelerate launch --num_processes N script.py`` (or ``python -m
torch.distributed.run --nproc_per_node N script.py``): ``evaluate_unlearning`` then splits its images without being
told. Each process must hold the same pipeline (load it, and serve the same requests, in every process) on its own
device (``PartialState().device``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from .._validation import check_int
from ..images import generate_images
from .classifiers import Classifier, classify


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by ``accelerate launch`` and
    ``torch.distributed.run``); 1 for a plain ``python script.py``."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def evaluation_state(accelerator: Any = None) -> Any:
    """The accelerate state an evaluation splits its images over, or None for this process alone.

    Args:
        accelerator: an ``accelerate.Accelerator`` or ``PartialState``; None: ``PartialState()`` when the script was
            launched on several processes, else None; False: this process alone, however it was launched.

    Returns:
        The state (with ``num_processes``, ``process_index``, ``split_between_processes``), or None.

    Raises:
        TypeError: ``accelerator`` is neither of those.
    """
    if accelerator is False:
        return None
    if accelerator is None:
        # accelerate joins CPU processes (gloo) only when told it runs on the CPU; on a GPU each process takes its own
        return PartialState(cpu=not torch.cuda.is_available()) if launched_processes() > 1 else None
    if not all(hasattr(accelerator, name) for name in ("num_processes", "process_index", "split_between_processes")):
        raise TypeError(f"accelerator must be an accelerate Accelerator or PartialState, None or False, got "
                        f"{accelerator!r}")
    return accelerator


def generate_and_classify(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    classifiers: Sequence[Classifier],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 64,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    desc: str = "generating",
    accelerator: Any = None,
) -> tuple[torch.Tensor, list[list[str]]]:
    """One image per ``(prompts[i], seeds[i])`` and each classifier's labels for them, the batches shared out over
    the processes of ``accelerator`` (``evaluation_state``); every process gets everything, in order.

    Args:
        pipe: the pipeline that draws (the same in every process).
        prompts: one prompt per image.
        seeds: one seed per image.
        classifiers: each is called once per batch.
        num_inference_steps: sampling steps.
        guidance_scale: guidance scale.
        batch_size: images per pipeline call and per classifier call.
        height: image height (default: the pipeline's).
        width: image width (default: the pipeline's).
        progress: a progress bar (on the main process only).
        desc: its label.
        accelerator: see ``evaluation_state``.

    Returns:
        ``(images [N, 3, H, W] in [0, 1] on the CPU, [labels of each classifier])``.

    Raises:
        ValueError: a prompt without a seed, no prompts, a bad batch size, or a classifier that answers the wrong
            number of labels.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    if not prompts:
        raise ValueError("nothing to generate: no prompts")
    check_int(batch_size, "batch_size", minimum=1)
    state = evaluation_state(accelerator)
    starts = list(range(0, len(prompts), batch_size))
    if state is None or state.num_processes == 1:
        mine = starts
        main = True
    else:
        with state.split_between_processes(starts) as share:
            mine = list(share)
        main = state.process_index == 0
    done: list[tuple[int, torch.Tensor, list[list[str]]]] = []
    count = sum(len(prompts[start : start + batch_size]) for start in mine)
    with tqdm(total=count, desc=desc, unit="img", disable=not (progress and main), leave=False) as bar:
        for start in mine:
            end = start + batch_size
            images = generate_images(pipe, prompts[start:end], seeds[start:end],
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                     batch_size=batch_size, height=height, width=width, progress=False)
            done.append((start, images, [classify(c, images) for c in classifiers]))
            bar.update(len(images))
    if state is not None and state.num_processes > 1:
        done = sorted(gather_object(done), key=lambda batch: batch[0])
    if [batch[0] for batch in done] != starts:
        raise RuntimeError(f"gathered batches {[b[0] for b in done]} instead of {starts}: every process must "
                           "evaluate the same cases")
    images = torch.cat([batch[1] for batch in done])
    labels = [[label for batch in done for label in batch[2][k]] for k in range(len(classifiers))]
    return images, labels


def classify_batches(classifiers: Sequence[Classifier], images: torch.Tensor, batch_size: int) -> list[list[str]]:
    """Each classifier's labels for ``images``, called on the batches ``generate_and_classify`` would use (so that
    scores of given images match scores of generated ones call for call)."""
    check_int(batch_size, "batch_size", minimum=1)
    out: list[list[str]] = [[] for _ in classifiers]
    for start in range(0, len(images), batch_size):
        for k, classifier in enumerate(classifiers):
            out[k] += classify(classifier, images[start : start + batch_size])
    return out
