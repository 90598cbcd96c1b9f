"""One MiniCanvas evaluation on 1 process and on N processes, side by side: the images shared out by
``evaluate_unlearning`` under ``torch.distributed.run``, the scores compared.

    python scripts/eval_processes.py [--processes 2] [--eval-seeds 2] [--styles 48] [--objects 12]
                                        [--steps 20] [--batch-size 32] [--repeats 1]

Each side is a fresh ``python -m torch.distributed.run --standalone --nproc-per-node n`` of this script (the same
launcher on both sides, so that only the number of processes differs); the cores this process may use are divided
among the n processes (1 process: all of them, as torch threads). Every process loads the shipped MiniCanvas
pipeline and classifiers (not timed), draws one warm-up image, waits for the others, and the main process times
``evaluate_unlearning`` on the base model (the first style counted as removed), the best of ``--repeats``. Prints
both sides in images per second, the speed-up (1-process seconds / N-process seconds), whether every score is equal
and the largest pixel difference between the two sides' images (the sides run different thread counts, so the
images agree to float rounding, not necessarily bit for bit).

Time it on idle cores only: other load on the machine changes both sides unequally.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import table  # noqa: E402

SCORES = ("ua", "ira", "cra", "accuracy", "cross_accuracy", "cross_removed", "num_images")


def worker(args: argparse.Namespace) -> None:
    """One process of one side: evaluate, and (main process) write the figures and the images to ``args.out``."""
    import torch

    torch.set_num_threads(args.threads)
    from accelerate import PartialState

    import diffusers_unlearn as du
    from diffusers_unlearn import minicanvas as mc
    from diffusers_unlearn.evaluation import evaluate_unlearning, generate_images

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes join only when told (gloo)
    world = mc.eval_world()
    pipe = du.attach(mc.load_pipeline())
    pipe.set_progress_bar_config(disable=True)
    style_clf, object_clf = world.load_classifiers()
    config = world.eval_config(seeds=args.eval_seeds, styles=list(mc.STYLES)[: args.styles],
                               objects=list(mc.OBJECTS)[: args.objects], num_inference_steps=args.steps,
                               batch_size=args.batch_size)
    generate_images(pipe, [config.prompt(config.styles[0], config.objects[0])], [0],
                    num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                    progress=False)  # warm-up: first-call costs stay out of the timing
    best, scores = float("inf"), None
    for _ in range(args.repeats):
        state.wait_for_everyone()
        started = time.perf_counter()
        scores = evaluate_unlearning(pipe, config.styles[:1], "style", style_clf, object_clf, config, progress=False)
        best = min(best, time.perf_counter() - started)
    if state.is_main_process:
        torch.save(scores.images, Path(args.out) / "images.pt")
        figures = {"seconds": best, "processes": state.num_processes, "threads": args.threads,
                   **{k: getattr(scores, k) for k in SCORES}}
        (Path(args.out) / "figures.json").write_text(json.dumps(figures))
    state.wait_for_everyone()


def side(args: argparse.Namespace, processes: int, out: Path) -> dict:
    """Launch one side and read back its figures and images."""
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) // processes)
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(Path(__file__).resolve()), "--worker", "--out", str(out), "--threads", str(threads),
               "--eval-seeds", str(args.eval_seeds), "--styles", str(args.styles), "--objects", str(args.objects),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{result.stderr[-3000:]}")
    figures = json.loads((out / "figures.json").read_text())
    figures["images"] = torch.load(out / "images.pt")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="processes of the second side (default 2)")
    parser.add_argument("--eval-seeds", type=int, default=2, help="the first N of MiniCanvas's EVAL_SEEDS")
    parser.add_argument("--styles", type=int, default=48, help="the first N styles (default: all 48)")
    parser.add_argument("--objects", type=int, default=12, help="the first N objects (default: all 12)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (MiniCanvas's: 20)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per pipeline call (the bench's: 32)")
    parser.add_argument("--repeats", type=int, default=1, help="timed evaluations per side; the best is kept")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.processes < 2:
        parser.error(f"--processes must be >= 2, got {args.processes}")
    with tempfile.TemporaryDirectory() as tmp:
        one = side(args, 1, Path(tmp) / "one")
        many = side(args, args.processes, Path(tmp) / "many")
    n = one["num_images"]
    rows = [[str(s["processes"]), str(s["threads"]), f"{s['seconds']:.2f}", f"{n / s['seconds']:.1f}",
             f"{s['ua']:.1f} / {s['ira']:.1f} / {s['cra']:.1f}"] for s in (one, many)]
    print(f"MiniCanvas evaluation: {n} images ({args.styles} styles x {args.objects} objects x {args.eval_seeds} "
          f"seeds), {args.steps} sampling steps, batches of {args.batch_size}, best of {args.repeats}, "
          f"{len(os.sched_getaffinity(0))} cores\n")
    print(table(rows, ["processes", "threads each", "seconds", "images/s", "UA / IRA / CRA"]))
    equal = all(one[k] == many[k] for k in SCORES)
    difference = float((one["images"] - many["images"]).abs().max())
    print(f"\nspeed-up on {args.processes} processes: {one['seconds'] / many['seconds']:.2f}x; scores "
          f"{'equal' if equal else 'DIFFERENT'}; largest pixel difference {difference:.2e}")


if __name__ == "__main__":
    main()
