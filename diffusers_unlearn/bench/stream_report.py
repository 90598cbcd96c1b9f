"""Report of a mixed stream (``bench.mixed``): results table (Markdown and JSON), the metric curves with each
request's domain marked, per-request cost and drift, and the per-concept UA matrix (PNG)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .report import _colors, _pct, _table, pyplot

# (row key, column label) of the final-row table, in order
FINAL_COLUMNS = (("ua", "UA"), ("ua_style", "UA styles"), ("ua_object", "UA objects"), ("ua_heldout", "UA held-out"),
                 ("min_ua", "lowest concept UA"), ("ira", "IRA"), ("cra", "CRA"),
                 ("cross_removed", "objects kept in removed-style prompts"),
                 ("cross_removed_object", "styles kept in removed-object prompts"),
                 ("frechet", "kept-image Fréchet distance"))
# the goals after the whole stream: (label, key, absolute floor or None, fraction of base or None)
GOALS = (("UA", "ua", 95.0, None), ("UA held-out", "ua_heldout", 90.0, None),
         ("every removed concept's UA", "min_ua", 90.0, None), ("IRA", "ira", None, 0.85),
         ("CRA", "cra", None, 0.9), ("objects kept in removed-style prompts", "cross_removed", None, 0.85))
DOMAIN_MARKERS = {"style": "o", "object": "^"}
DOMAIN_COLORS = {"style": "#4c72b0", "object": "#dd8452"}


def min_ua(row: dict[str, Any], removed: list[str]) -> float | None:
    """The lowest UA of one removed concept in a scored row (None: not scored, or nothing removed)."""
    accuracy = row.get("accuracy")
    if not accuracy or not removed:
        return None
    return min(100.0 - accuracy[c] for c in removed)


def _removed_by(result: dict[str, Any], k: int) -> list[str]:
    return [r["concept"] for r in result["requests"][:k]]


def final_values(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The last row of protocol ``name`` with ``min_ua`` added."""
    row = dict(result["protocols"][name]["rows"][-1])
    row["min_ua"] = min_ua(row, _removed_by(result, row["request"]))
    return row


def base_values(result: dict[str, Any]) -> dict[str, Any]:
    """The base model's figures on the same sets: IRA and CRA of the base row, and what the removed concepts'
    prompts kept at base (the base images scored as if the whole run were served)."""
    base, whole = result["base"], result["base_removed"]
    return {"ira": base["ira"], "cra": base["cra"], "cross_removed": whole["cross_removed"],
            "cross_removed_object": whole["cross_removed_object"], "ua": whole["ua"], "ua_style": whole["ua_style"],
            "ua_object": whole["ua_object"], "min_ua": min_ua(whole, _removed_by(result, len(result["requests"]))),
            "ua_heldout": None, "frechet": None if base["frechet"] is None and not any(
                p["rows"][-1].get("frechet") is not None for p in result["protocols"].values()) else 0.0}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if key == "frechet" else _pct(value)


def stream_headline(result: dict[str, Any]) -> list[str]:
    """The after-the-last-request table: the base model's figures on the same sets, then each protocol."""
    header = ["", *[label for _, label in FINAL_COLUMNS], "K/V drift", "requests' seconds"]
    base = base_values(result)
    rows = [["base model (same images)", *[_cell(k, base[k]) for k, _ in FINAL_COLUMNS], "0", "0"]]
    for name, protocol in result["protocols"].items():
        final = final_values(result, name)
        rows.append([protocol["label"], *[_cell(k, final[k]) for k, _ in FINAL_COLUMNS], f"{final['drift']:.4f}",
                     f"{final['cumulative_seconds']:.1f}"])
    return _table(header, rows)


def goal_table(result: dict[str, Any]) -> list[str]:
    """Each goal of the stream (issue 31) against each protocol's last row: met or missed, by how much."""
    base = base_values(result)
    header = ["goal", "target", *[p["label"] for p in result["protocols"].values()]]
    rows = []
    for label, key, floor, fraction in GOALS:
        target = floor if floor is not None else (None if base[key] is None else fraction * base[key])
        text = f">= {floor:g}" if floor is not None else f">= {fraction:g}x base ({_pct(target)})"
        cells = []
        for name in result["protocols"]:
            value = final_values(result, name)[key]
            if value is None or target is None:
                cells.append("n/a")
            else:
                verdict = "met" if value >= target - 1e-9 else f"missed by {target - value:.1f}"
                cells.append(f"{_pct(value)} ({verdict})")
        rows.append([label, text, *cells])
    return _table(header, rows)


def ua_matrix_stream(result: dict[str, Any], name: str) -> tuple[list[int], list[list[float | None]]]:
    """Per-concept UA of protocol ``name``: the scored requests (columns), and per removed concept (rows, in stream
    order) its UA after each of them (None before its own request)."""
    scored = [r for r in result["protocols"][name]["rows"][1:] if r["scored"]]
    concepts = _removed_by(result, len(result["requests"]))
    matrix = [[None if row["request"] < i else 100.0 - row["accuracy"][c] for row in scored]
              for i, c in enumerate(concepts, start=1)]
    return [r["request"] for r in scored], matrix


def _order_text(result: dict[str, Any]) -> str:
    return ", ".join(f"{k}. `{r['concept']}`" + (" (object)" if r["domain"] == "object" else "")
                     for k, r in enumerate(result["requests"], start=1))


def _listing(concepts: list[str]) -> str:
    return ", ".join(f"`{c}`" for c in concepts) or "none"


def markdown_stream(result: dict[str, Any], title: str | None = None) -> str:
    """The whole stream report as Markdown: command, order, the protected and scored sets, the final table, the
    goals, every request's figures and the per-concept UA.

    Args:
        result: ``run_stream_bench``'s result (or its ``results.json`` read back).
        title: the heading (None: "Mixed removal stream").

    Returns:
        The Markdown text.
    """
    settings, stream, world = result["settings"], result["stream"], result["world"]
    requests = result["requests"]
    n = len(requests)
    counts = {d: sum(r["domain"] == d for r in requests) for d in ("style", "object")}
    eval_cfg = world["eval"]
    solved = all(p.get("method") == "closed_form" for p in result["protocols"].values())
    every = settings["every"]
    lines = [f"## {title or 'Mixed removal stream'}", ""]
    if result.get("command"):
        lines += ["Command:", "", "```bash", result["command"], "```", ""]
    lines += [
        f"Stream `{stream['name']}` ({stream['description']}) on world `{world['name']}`: {n} requests, "
        f"{counts['style']} styles and {counts['object']} objects, "
        + ("solved in closed form (no training)" if solved else f"with `{settings['method']}`")
        + f", in this order: {_order_text(result)}.",
        "",
        f"Scored sets (disjoint from every protected set): IRA over the {len(stream['kept']['style'])} kept styles "
        f"{_listing(stream['kept']['style'])}; CRA over the {len(stream['kept']['object'])} kept objects "
        f"{_listing(stream['kept']['object'])}. Protected (what the protocols that keep concepts were given, never "
        "scored): " + "; ".join(f"{d}: {_listing(c)}" for d, c in world["protected"].items()) + ". "
        + "Request prompts are written with: " + "; ".join(
            f"{d} requests: {_listing(c)}" for d, c in world["request_prompt_others"].items()) + ".",
        "",
        f"Evaluation: {result['base']['num_images']} images ({len(eval_cfg['styles'])} styles x "
        f"{len(eval_cfg['objects'])} objects x {len(eval_cfg['seeds'])} seed(s), {eval_cfg['num_inference_steps']} "
        f"steps, guidance {eval_cfg['guidance_scale']}), after "
        + ("every request" if every == 1 else f"every {every} requests and the last") + ". "
        "All scores in percent. UA (unlearning accuracy, 100: fully erased): 100 - the mean accuracy of the removed "
        "concepts' own classifier over all their images, over everything "
        "removed so far (styles and objects alike; per domain: UA styles, UA objects). IRA: the style classifier on "
        "the kept styles' images drawn with kept objects; CRA: the object classifier on the kept objects' images in "
        "kept styles (fixed sets, so the curve compares like with like; the base row is the same images of the base "
        "model). Objects kept in removed-style prompts: the object classifier on the removed styles' images of kept "
        "objects; styles kept in removed-object prompts: the style classifier on the removed objects' images in kept "
        f"styles. UA held-out: the removed concepts in {len(world.get('heldout_templates', []))} wordings never used "
        "in training, each drawn with the first kept concepts of the other domain.",
        "",
        f"Whole run: {result['seconds'] / 60:.1f} min ({result['environment'].get('jobs', 1)} worker process(es), "
        f"{result['environment']['threads']} torch thread(s) each).",
        "",
        f"### After request {n}",
        "",
        *stream_headline(result),
        "",
        "Base model (same images): the base model's figures on the same images, with every removal of the run "
        "counted as removed (its UA is how little the base already fails to recognise them). K/V drift: "
        "||W - W_base||_F / ||W_base||_F over the cross-attention K/V weights. Requests' seconds: the solves' or "
        "trainings' time summed over the stream (evaluation excluded).",
        "",
        "### Goals after the whole stream",
        "",
        *goal_table(result),
        "",
    ]
    keys = (("domain", None), ("concept", None), ("ua", "UA"), ("ua_style", "UA styles"),
            ("ua_object", "UA objects"), ("ua_heldout", "UA held-out"), ("ira", "IRA"), ("cra", "CRA"),
            ("cross_removed", "objects in removed styles"), ("cross_removed_object", "styles in removed objects"),
            ("drift", "K/V drift"), ("seconds", "s"))
    for protocol in result["protocols"].values():
        lines += [f"### {protocol['label']}: every request", ""]
        table = []
        for row in protocol["rows"]:
            cells = [str(row["request"])]
            for key, _ in keys:
                value = row.get(key)
                if key in ("domain", "concept"):
                    cells.append("base" if value is None and key == "domain" else (value or ""))
                elif key == "drift":
                    cells.append(f"{value:.4f}")
                elif key == "seconds":
                    cells.append(f"{value:.1f}")
                else:
                    cells.append("" if not row["scored"] else _pct(value))
            table.append(cells)
        lines += _table(["request", *[label or key for key, label in keys]], table) + [""]
    lines += ["### Per-concept UA (removed concept x scored request)", "",
              "UA of each removed concept after every scored request (`ua_matrix.png`): a concept whose UA falls "
              "again has come back.", ""]
    for name, protocol in result["protocols"].items():
        columns, matrix = ua_matrix_stream(result, name)
        lines += [f"{protocol['label']}:", ""]
        lines += _table(["concept", *[str(k) for k in columns]],
                        [[f"{i}. {r['concept']}" + (" (object)" if r["domain"] == "object" else "")]
                         + ["" if v is None else f"{v:.0f}" for v in matrix[i - 1]]
                         for i, r in enumerate(requests, start=1)]) + [""]
    return "\n".join(lines)


def _mark_domains(ax: Any, result: dict[str, Any]) -> None:
    """Shade the object requests and tick every request in its domain's colour."""
    for k, request in enumerate(result["requests"], start=1):
        if request["domain"] == "object":
            ax.axvspan(k - 0.5, k + 0.5, color=DOMAIN_COLORS["object"], alpha=0.12, linewidth=0)


def plot_stream_metrics(result: dict[str, Any], path: str | os.PathLike) -> None:
    """UA (all, styles, objects), IRA, CRA and what removed prompts keep, after every scored request, one line per
    protocol; object requests shaded and every point marked with the domain of the request before it.

    Args:
        result: ``run_stream_bench``'s result.
        path: the PNG file to write.
    """
    plt = pyplot()
    names = list(result["protocols"])
    colors = _colors(names)
    n = len(result["requests"])
    panels = (("ua", "UA: everything removed so far"), ("ua_style", "UA of the removed styles"),
              ("ua_object", "UA of the removed objects"), ("ira", "IRA: kept styles"), ("cra", "CRA: kept objects"),
              ("cross_removed", "objects kept in removed-style prompts"))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True)
    for ax, (metric, label) in zip(axes.flat, panels):
        _mark_domains(ax, result)
        for name in names:
            rows = [r for r in result["protocols"][name]["rows"] if r["scored"] and r.get(metric) is not None]
            xs, ys = [r["request"] for r in rows], [r[metric] for r in rows]
            ax.plot(xs, ys, color=colors[name], linewidth=1.4, label=result["protocols"][name]["label"])
            for domain, marker in DOMAIN_MARKERS.items():
                chosen = [(x, y) for x, y, r in zip(xs, ys, rows) if r["domain"] == domain]
                ax.scatter([p[0] for p in chosen], [p[1] for p in chosen], marker=marker, s=18, color=colors[name],
                           zorder=3)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(-3, 103)
        ax.set_xlim(-0.5, n + 0.5)
        ax.set_xticks(range(0, n + 1, 3 if n > 12 else 1))
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("number of removal requests")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy-based score (%)")
    handles = [plt.Line2D([], [], color=colors[name], label=result["protocols"][name]["label"]) for name in names]
    handles += [plt.Line2D([], [], color="gray", marker=DOMAIN_MARKERS[d], linestyle="", label=f"after a {d} request")
                for d in DOMAIN_MARKERS]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=DOMAIN_COLORS["object"], alpha=0.25, label="object request"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    stream = result["stream"]
    methods = ", ".join(dict.fromkeys(p["method"] for p in result["protocols"].values()))
    fig.suptitle(f"{result['world']['name']}: stream {stream['name']} ({n} requests), {methods}", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_stream_cost(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Seconds of each request (coloured by its domain) and the K/V drift after it, per protocol (PNG)."""
    plt = pyplot()
    names = list(result["protocols"])
    colors = _colors(names)
    n = len(result["requests"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    for name in names:
        rows = result["protocols"][name]["rows"][1:]
        label = result["protocols"][name]["label"]
        axes[0].plot([r["request"] for r in rows], [r["seconds"] for r in rows], color=colors[name], linewidth=1,
                     label=label)
        for domain, marker in DOMAIN_MARKERS.items():
            chosen = [r for r in rows if r["domain"] == domain]
            axes[0].scatter([r["request"] for r in chosen], [r["seconds"] for r in chosen], marker=marker, s=18,
                            color=DOMAIN_COLORS[domain], zorder=3, label=f"{domain} request" if name == names[0]
                            else None)
        axes[1].plot([r["request"] for r in rows], [r["drift"] for r in rows], color=colors[name], marker="o",
                     markersize=3, label=label)
    axes[0].set_title("seconds per request (solve or training)", fontsize=10)
    axes[1].set_title("K/V drift ||W - W_base|| / ||W_base||", fontsize=10)
    drifts = [r["drift"] for p in result["protocols"].values() for r in p["rows"][1:]]
    if drifts and min(drifts) > 0 and max(drifts) / min(drifts) > 100:  # closed form and trained protocols together
        axes[1].set_yscale("log")
    for ax in axes:
        _mark_domains(ax, result)
        ax.set_xlabel("request")
        ax.set_xlim(0.5, n + 0.5)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_stream_ua_matrix(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Heat-map per protocol: UA of each removed concept (rows; objects marked) after each scored request (PNG)."""
    plt = pyplot()
    names = list(result["protocols"])
    requests = result["requests"]
    labels = [f"{r['concept']}" + (" (obj)" if r["domain"] == "object" else "") for r in requests]
    height = 0.3 * len(requests) + 1.6
    fig, axes = plt.subplots(1, len(names), figsize=(len(names) * (0.28 * len(requests) + 3.2) + 1, height),
                             squeeze=False, layout="constrained")
    image = None
    for ax, name in zip(axes.flat, names):
        columns, matrix = ua_matrix_stream(result, name)
        values = np.array([[np.nan if v is None else v for v in row] for row in matrix], float)
        image = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_title(result["protocols"][name]["label"], fontsize=10)
        ax.set_xticks(range(len(columns)), [str(k) for k in columns], fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for tick, request in zip(ax.get_yticklabels(), requests):
            tick.set_color(DOMAIN_COLORS[request["domain"]])
        ax.set_xlabel("after request", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="UA of the concept (%)")
    fig.suptitle(f"{result['world']['name']}: stream {result['stream']['name']}, per-concept UA", fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_stream_report(result: dict[str, Any], out_dir: str | os.PathLike, title: str | None = None
                        ) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``metrics.png``, ``cost.png`` and ``ua_matrix.png`` of a stream run
    into ``out_dir``.

    Args:
        result: ``run_stream_bench``'s result.
        out_dir: the folder (created if missing).
        title: the Markdown's heading.

    Returns:
        The paths, by kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "metrics_plot": out / "metrics.png",
             "cost_plot": out / "cost.png", "ua_matrix_plot": out / "ua_matrix.png"}
    # allow_nan=False: undefined scores are None (null), never NaN, so the file is strict JSON
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown_stream(result, title) + "\n")
    plot_stream_metrics(result, paths["metrics_plot"])
    plot_stream_cost(result, paths["cost_plot"])
    plot_stream_ua_matrix(result, paths["ua_matrix_plot"])
    return paths
