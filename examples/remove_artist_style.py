"""Remove an artist's style from a Stable Diffusion 1.5 checkpoint, on one GPU or several.

    accelerate launch examples/remove_artist_style.py --artist "van gogh" --retain "claude monet,pablo picasso" \
        --out van-gogh-removed
    accelerate launch --num_processes 4 examples/remove_artist_style.py --artist "van gogh" --mixed-precision bf16 ...

Every process runs this script; the request's batch is split between them and their gradients are averaged, so
each process ends with the same adapter and ledger; the main process writes the folder. The result is a plain
diffusers pipeline folder (``DiffusionPipeline.from_pretrained`` loads it) with the removal folded in, the request
as a diffusers LoRA, the ledger and a model card.

Tried on the CPU with the shipped MiniCanvas model (its styles are MiniCanvas's own)::

    python examples/remove_artist_style.py --model minicanvas --artist "neon dots" --retain "neon lines" \
        --neighbors 0 --steps 20 --sampling-steps 10 --out /tmp/neon-dots-removed
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="Hub id or folder of an SD 1.x/2.x/XL pipeline, or 'minicanvas' / 'tiny' (offline)")
    parser.add_argument("--artist", required=True, help="the style to remove, e.g. 'van gogh'")
    parser.add_argument("--retain", default="", help="comma-separated styles whose outputs must not move "
                                                     "(gradient projection; semantic neighbours are added)")
    parser.add_argument("--neighbors", type=int, default=None,
                        help="how many similar concepts of the built-in vocabulary gradient projection also protects "
                             "(default 8; 0 on MiniCanvas, whose 512-wide text encoder knows only its own styles and "
                             "objects: the vocabulary's real names are spelled letter by letter there)")
    parser.add_argument("--method", default="esd", help="erasure method: esd (default) or another registered one")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of the request's adapter")
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps of the frozen trajectories")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the unlearned pipeline folder to write")
    return parser.parse_args(argv)


# --8<-- [start:main]
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    import diffusers_unlearn as du

    retain = [s.strip() for s in args.retain.split(",") if s.strip()]
    neighbors = {} if args.neighbors is None else {"neighbors": args.neighbors}
    regularizers = [du.GradientProjection(keep=retain, **neighbors)]
    # Checked in full here, before the model loads: a typo fails in seconds, not after the download.
    request = du.UnlearnRequest.build(
        args.artist, args.method, domain="style", seed=args.seed, regularizers=regularizers,
        training=du.TrainingConfig(steps=args.steps, learning_rate=args.learning_rate, rank=args.rank,
                                   mixed_precision=args.mixed_precision),
        sampling_steps=args.sampling_steps,
    )
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    pipe = du.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=not accelerator.is_local_main_process)
    record = pipe.unlearn(request, accelerator=accelerator)  # moves the pipeline to this process's device
    if accelerator.is_main_process:
        print(f"removed {record.concept!r} as {record.request_id}: {record.steps} steps in {record.seconds:.1f}s on "
              f"{accelerator.num_processes} process(es), final loss {record.final_loss:.4g}")
        folder = pipe.save_unlearned(args.out, base_model=args.model if "/" in args.model else None)
        print(f"wrote {folder} (load it with diffusers' DiffusionPipeline.from_pretrained)")
    accelerator.wait_for_everyone()
    return 0
# --8<-- [end:main]


if __name__ == "__main__":
    raise SystemExit(main())
