"""mkdocs hook: render ``diffusers-unlearn --help`` and every subcommand's ``--help`` into the CLI reference page.

The page (docs/reference/cli.md) holds the marker ``<!-- cli-reference -->``; at build time it is replaced by the
help text of the real argparse parser (``diffusers_unlearn.cli.build_parser``), so the page cannot drift from the
code. Building the parser imports no torch: each subcommand module keeps its heavy imports inside ``run``.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"
WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the page is the same on every machine


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subparsers as one action; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render_cli_reference() -> str:
    from diffusers_unlearn.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        parts = ["### `diffusers-unlearn`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in _subcommands(parser).items():
            parts += [f"### `diffusers-unlearn {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - mkdocs' hook signature
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render_cli_reference())
    return markdown
