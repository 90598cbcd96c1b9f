"""``diffusers-unlearn demo``: remove two styles in sequence from MiniCanvas with the recommended recipe.

Loads the shipped MiniCanvas model, measures UA / IRA / CRA before and after each request, writes a before/after
image grid (the removed styles, their family neighbours, one unrelated style) and the ledger into --out.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ._common import default_text

DEMO_REQUESTS = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="remove two styles from MiniCanvas with the recommended recipe "
                                   "(the closed-form solve); before/after grid and UA/IRA/CRA", description=__doc__)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per request, for a trained recipe "
                        f"({default_text('bench/protocols.py', 'Hyperparameters', 'steps')}, as in bench; the "
                        "closed-form solve trains nothing)")
    parser.add_argument("--eval-seeds", type=int, default=2,
                        help="evaluation images per prompt: the first N of MiniCanvas's EVAL_SEEDS (default 2)")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="sampling steps of the images and of the requests' trajectories (default: MiniCanvas's "
                        "recommended NUM_INFERENCE_STEPS)")
    parser.add_argument("--out", default="unlearn-demo",
                        help="folder for the image grid and the ledger (default ./unlearn-demo)")
    parser.add_argument("--weights-dir", default=None, help="MiniCanvas weights folder (default: the shipped one)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def grid_styles(removed: list[str], families: dict[str, list[str]], evaluated: list[str]) -> list[str]:
    """Rows of the grid, among the ``evaluated`` styles (their images exist already): each removed style's family
    members (its nearest neighbours), then one style of an untouched family."""
    rows: list[str] = []
    touched = set()
    for style in removed:
        family = next((name for name, members in families.items() if style in members), None)
        members = families[family] if family is not None else [style]
        touched.add(family)
        rows += [m for m in members if m not in rows and m in evaluated]
    untouched = next((m for name, members in families.items() if name not in touched
                      for m in members if m in evaluated), None)
    return rows + ([untouched] if untouched else [])


def save_grid(panels: list[tuple[str, Any]], styles: list[str], objects: list[str], removed: list[str],
              path: str | os.PathLike) -> None:
    """One panel per model state: rows = styles (removed ones marked), columns = objects."""
    import matplotlib.pyplot as plt

    fig = grid_figure(panels, styles, objects, removed)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_figure(panels: list[tuple[str, Any]], styles: list[str], objects: list[str], removed: list[str]) -> Any:
    """The matplotlib figure of :func:`save_grid`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import textwrap

    import torch

    rows, cols = len(styles), len(objects)
    size = panels[0][1].shape[-1]
    gap = max(1, size // 16)
    cell = 0.62  # inches per image: room for 10-point labels under every column
    fig, axes = plt.subplots(1, len(panels), figsize=(cell * cols * len(panels) + 1.8, cell * rows + 1.4),
                             squeeze=False)
    centres = lambda n: [k * (size + gap) + size / 2 for k in range(n)]  # noqa: E731
    for index, (ax, (title, images)) in enumerate(zip(axes[0], panels)):
        canvas = torch.ones(3, rows * (size + gap) - gap, cols * (size + gap) - gap)
        for i in range(rows):
            for j in range(cols):
                y, x = i * (size + gap), j * (size + gap)
                canvas[:, y : y + size, x : x + size] = images[i * cols + j]
        ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
        # wrapped to the panel's width: long titles ("after removing a, b") would run into the next panel
        ax.set_title(textwrap.fill(title, width=max(12, int(cols * 5.5))), fontsize=12)
        ax.set_xticks(centres(cols), objects, fontsize=10, rotation=45, ha="right", rotation_mode="anchor")
        # row labels once, on the left panel; no tick marks anywhere (the labels sit next to their images)
        labels = [f"{s} (removed)" if s in removed else s for s in styles] if index == 0 else []
        ax.set_yticks(centres(rows) if index == 0 else [], labels, fontsize=10)
        ax.tick_params(length=0)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> int:
    from ._common import check_writable

    check_writable(args.out)
    from .. import minicanvas as mc
    from ..bench import PROTOCOLS, BenchSettings, method_hyperparameters, minicanvas_world, serve_request
    from ..bench.world_recipe import RECOMMENDED_PROTOCOL
    from ..engine.erasure_check import verdict
    from ..evaluation import EvalReference, evaluate_unlearning, generate_images, kv_drift
    from ..mixins.attach import attach
    from ._common import set_quiet

    set_quiet(args.quiet)
    hparams = None if args.steps is None else method_hyperparameters("esd", steps=args.steps)
    settings = BenchSettings(requests=DEMO_REQUESTS, domain="style", method="esd", protocols=[RECOMMENDED_PROTOCOL],
                             hparams=hparams)
    world = minicanvas_world(weights_dir=args.weights_dir, eval_seeds=args.eval_seeds, eval_steps=args.eval_steps)
    stream = world.stream("style", DEMO_REQUESTS)
    pipe = attach(world.load_pipeline())
    config = world.eval_config
    styles = grid_styles(stream, mc.STYLE_FAMILIES, list(config.styles))
    objects = list(config.objects)
    cases = config.cases()
    # the grid shows the first evaluation seed's images of its styles: no extra generation
    grid_rows = [cases.index((s, o, config.seeds[0])) for s in styles for o in objects]

    reference: list[EvalReference] = []  # the base model's images, once taken

    def snapshot(title: str, removed: list[str]) -> tuple[str, Any, Any]:
        images = generate_images(pipe, [config.prompt(s, o) for s, o, _ in cases], [seed for _, _, seed in cases],
                                 num_inference_steps=config.num_inference_steps,
                                 guidance_scale=config.guidance_scale, batch_size=config.batch_size,
                                 progress=not args.quiet, desc=title)
        scores = evaluate_unlearning(pipe, removed, "style", world.style_classifier, world.object_classifier, config,
                                     images=images, reference=reference[0] if reference else None)
        if not reference:
            reference.append(EvalReference.from_images(images))
        return title, images[grid_rows], scores

    protocol = PROTOCOLS[RECOMMENDED_PROTOCOL]
    print(f"MiniCanvas: {len(mc.STYLES)} styles x {len(mc.OBJECTS)} objects; removing {stream} with "
          f"{protocol.label} ({protocol.description}); scores on {len(config.cases())} images "
          f"({len(config.seeds)} seed(s) per prompt)")
    protected = sum(len(c) for c in world.vocabulary().values())
    print(f"scored (never protected): {len(config.styles)} styles and {len(config.objects)} objects; the recipe keeps "
          f"{protected} other MiniCanvas concepts (the honest protocol: docs/benchmarks/minicanvas.md)")
    states = [snapshot("base model", [])]
    for k, concept in enumerate(stream):
        steps, seconds = serve_request(pipe, protocol, world, settings, stream, k, progress=not args.quiet)
        record = pipe.unlearning_ledger.requests[-1]
        how = "solved, no training" if steps == 0 else f"{steps} steps, loss {record.final_loss:.4g}"
        tried = len(record.erasure.get("attempts") or [])
        again = f", after {tried} weaker attempt(s) the check sent back" if tried else ""
        print(f"removed {concept!r} as {record.request_id} in {seconds:.1f}s ({how}; erasure check: "
              f"{verdict(record.erasure)}{again})")
        states.append(snapshot(f"after removing {', '.join(stream[: k + 1])}", list(stream[: k + 1])))

    print()
    print("UA = unlearning accuracy, IRA = in-domain retain accuracy, CRA = cross-domain retain accuracy (percent); "
          "kept in removed = objects still drawn in the removed styles' prompts; image change = kept styles' images "
          "against the base's at the same seed, in seed-to-seed gaps")
    print("| model | UA | IRA | CRA | kept in removed | image change |")
    print("|---|---|---|---|---|---|")
    for title, _, scores in states:
        cells = [scores.ua, scores.ira, scores.cra, scores.cross_removed]
        change = "n/a" if scores.image_change is None else f"{scores.image_change:.2f}"
        print(f"| {title} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in cells) + f" | {change} |")
    print(f"K/V drift from the base: {kv_drift(pipe):.4f}")
    print("removed concepts:", pipe.removed_concepts)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "demo_grid.png"
    save_grid([(title, images) for title, images, _ in states], styles, objects, list(stream), grid)
    pipe.save_unlearning(out)
    print(f"wrote {grid} and the ledger ({out / 'ledger.json'}, adapters/)")
    return 0
