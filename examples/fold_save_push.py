"""Fold, save and publish an unlearned pipeline: one diffusers folder with the removals baked into the weights,
each request as a diffusers LoRA, the ledger and a model card, pushed to the Hub in one commit.

    python examples/fold_save_push.py artist-stream-out --repo-id you/sd15-without-artists --dry-run
    python examples/fold_save_push.py artist-stream-out --repo-id you/sd15-without-artists --private

``--dry-run`` lists every file the push would send and prints the model card; nothing leaves the machine. The token
comes from ``HF_TOKEN`` or your ``hf auth login`` and goes only to huggingface_hub. Tried on the CPU with
the shipped MiniCanvas model, on a folder from run_plan_stream.py::

    python examples/fold_save_push.py /tmp/stream --out /tmp/stream-published --repo-id you/minicanvas-unlearned \
        --dry-run
"""

from __future__ import annotations

import argparse
import json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("folder", help="an unlearned pipeline folder")
    parser.add_argument("--out", default=None, help="write the folded folder here (default: rewrite FOLDER)")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model, for the card")
    parser.add_argument("--evaluation", default=None, metavar="JSON",
                        help='overall figures for the card, e.g. \'{"UA": 91.7, "IRA": 96.7}\'')
    parser.add_argument("--repo-id", required=True, help="the Hub model repo, e.g. you/sd15-without-artists")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="list the files and print the card; no network")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import diffusers_unlearn as du
    from diffusers_unlearn.publishing import hub

    hub.check_repo_id(args.repo_id)  # a bad id fails before anything is loaded or written
    evaluation = json.loads(args.evaluation) if args.evaluation else None
    pipe = du.load_pipeline(args.folder)
    pipe.fold()  # plain K/V layers at base speed: what plain diffusers will load
    folder = pipe.save_unlearned(args.out or args.folder, base_model=args.base_model, evaluation=evaluation)
    for request_id in pipe.unlearning_ledger.ids():
        lora = pipe.export_lora(request_id, folder / "unlearning" / "lora")  # also written by save_unlearned
        print(f"{request_id}: diffusers LoRA {lora.path.name} (rank <= {lora.max_rank}, {lora.bytes} bytes)")
    if args.dry_run:
        print(hub.plan_push(folder, args.repo_id, private=args.private or None).describe())
        return 0
    commit = pipe.push_to_hub(args.repo_id, private=args.private or None, base_model=args.base_model,
                              evaluation=evaluation)
    print(f"pushed {folder} to {commit.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
