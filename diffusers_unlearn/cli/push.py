"""``diffusers-unlearn push``: upload an unlearned pipeline folder to the Hugging Face Hub in one commit.

The token comes from --token, the HF_TOKEN environment variable or ``hf auth login``; it is never printed.
``--dry-run`` lists the files and prints the model card without any network access.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("push", help="upload an unlearned pipeline folder to the Hub (one commit)",
                                   description=__doc__)
    parser.add_argument("folder", metavar="FOLDER", help="a folder written by save_unlearned / unlearn / run / fold")
    parser.add_argument("--repo-id", required=True, help="Hub model id, e.g. user/my-unlearned-model")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_const", const=True, default=None,
                            help="create the repo private")
    visibility.add_argument("--public", dest="private", action="store_const", const=False, help="create it public")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--dry-run", action="store_true", help="list the files and print the card; no network")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..publishing.hub import plan_push, push_folder

    if args.dry_run:
        plan = plan_push(args.folder, args.repo_id, private=args.private, create_pr=args.create_pr)
        print("dry run: nothing is sent")
        print(plan.describe())
        return 0
    info = push_folder(args.folder, args.repo_id, private=args.private, token=args.token, create_pr=args.create_pr,
                       commit_message=args.commit_message)
    where = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or args.repo_id
    print(f"pushed {args.folder} to {args.repo_id} in one commit: {where}")
    return 0
