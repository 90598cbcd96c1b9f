"""Benchmark report: results table (Markdown and JSON), metric curves and cost curves (PNG)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS = (("ua", "UA"), ("ira", "IRA"), ("cra", "CRA"))
# what nobody named keeps beyond being recognised (evaluation/retention.py); None where a run did not measure it
RETENTION = (("cross_removed", "kept in removed prompts"), ("image_change", "kept-image change (seed gaps)"),
             ("frechet", "kept-image Fréchet distance"))
# What the three scores mean, for the plots' panel titles and the first lines of a report.
METRIC_NAMES = {"ua": "unlearning accuracy", "ira": "in-domain retain accuracy", "cra": "cross-domain retain accuracy"}
DEFINITIONS = ("UA = unlearning accuracy (100 - the percent of a removed concept's images its classifier still "
               "recognises: 100 is fully erased); IRA = in-domain retain accuracy (the kept concepts of the same "
               "domain, still recognised); CRA = cross-domain retain accuracy (the other domain's classifier on the "
               "same images). All in percent.")
REFERENCE = "sequential"


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def has_heldout(result: dict[str, Any]) -> bool:
    """Whether the run scored removed concepts in held-out wordings (``ua_heldout``)."""
    return any(r.get("ua_heldout") is not None for p in result["protocols"].values() for r in p["rows"])


def ua_matrix(result: dict[str, Any], protocol: str) -> list[list[float | None]]:
    """Per-concept UA: row i is the i-th removed concept, column k the state after request k+1 (None before the
    concept's own request). A concept that comes back shows as a falling row.

    Args:
        result: a bench result.
        protocol: the protocol's name.

    Returns:
        The matrix as nested lists.
    """
    stream = result["stream"]
    rows = result["protocols"][protocol]["rows"][1:]
    return [[None if k < i else 100.0 - row["accuracy"][concept] for k, row in enumerate(rows)]
            for i, concept in enumerate(stream)]


def final_rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each protocol's row after the last request."""
    return {name: p["rows"][-1] for name, p in result["protocols"].items()}


def headline(result: dict[str, Any]) -> list[str]:
    """The after-the-last-request table, with each protocol's change against plain sequential unlearning."""
    finals = final_rows(result)
    reference = finals.get(REFERENCE)
    heldout = has_heldout(result)
    header = ["protocol", "UA", "IRA", "CRA"]
    if reference is not None:
        header += ["ΔUA", "ΔIRA", "ΔCRA"]
    if heldout:
        header += ["UA held-out"]
    retention = [(key, label) for key, label in RETENTION if any(r.get(key) is not None for r in finals.values())]
    header += [label for _, label in retention]
    header += ["K/V drift", "training steps", "training s"]
    attacks = list(dict.fromkeys(kind for row in finals.values() for kind in row.get("attacks", {})))
    header += [f"robust UA ({kind})" for kind in attacks]
    rows = []
    for name, row in finals.items():
        cells = [result["protocols"][name]["label"]] + [_pct(row[m]) for m, _ in METRICS]
        if reference is not None:
            for metric, _ in METRICS:
                both = row[metric] is not None and reference[metric] is not None
                cells.append(_pct(row[metric] - reference[metric], signed=True) if both else "n/a")
        if heldout:
            cells.append(_pct(row.get("ua_heldout")))
        for key, _ in retention:
            value = row.get(key)
            cells.append("n/a" if value is None else _pct(value) if key == "cross_removed" else f"{value:.2f}")
        cells += [f"{row['drift']:.4f}", str(row["cumulative_steps"]), f"{row['cumulative_seconds']:.1f}"]
        cells += [_pct(row.get("attacks", {}).get(kind, {}).get("robust_ua")) for kind in attacks]
        rows.append(cells)
    return _table(header, rows)


def _method_settings(settings: dict[str, Any]) -> str:
    """", ESD eta 1.0 (reference: context)" / ", CA anchor 'painting'": the method's own bench settings, if any, and
    the retain loss's weight where there is one."""
    text = ""
    if settings["method"] == "esd" and "negative_guidance" in settings:
        text = f", ESD eta {settings['negative_guidance']} (reference: {settings.get('reference', 'empty')})"
    elif settings["method"] == "ca" and settings.get("anchor"):
        text = f", CA anchor {settings['anchor']!r}"
    weight = settings["hparams"].get("preserve_weight", 0.0)
    if weight:
        text += f", retain loss weight {weight} on the kept {settings['domain']}s (trained protocols)"
    return text


def markdown(result: dict[str, Any], title: str | None = None) -> str:
    """The whole results table as Markdown.

    Args:
        result: a bench result (``run_bench``'s return value, or ``results.json`` read back).
        title: the section title (default: "Continual unlearning benchmark").

    Returns:
        The Markdown text, with the command, the settings and the table.
    """
    settings, hp = result["settings"], result["settings"]["hparams"]
    base = result["base"]
    n = len(result["stream"])
    lines = [f"## {title or 'Continual unlearning benchmark'}", ""]
    if result.get("command"):
        lines += ["Command:", "", "```bash", result["command"], "```", ""]
    eval_cfg = result["world"]["eval"]
    domain, other = (("style", "object") if settings["domain"] == "style" else ("object", "style"))
    per_concept = len(eval_cfg["objects" if domain == "style" else "styles"]) * len(eval_cfg["seeds"])
    # a run of closed-form protocols only trained nothing: the training settings would say what did not happen
    solved = all(p.get("method") == "closed_form" for p in result["protocols"].values())
    method = "solved in closed form (no training)" if solved else f"with `{settings['method']}`"
    training = ("Per request: one closed-form solve keeping the world's other concepts and the earlier removals"
                if solved else f"Per request: {hp['steps']} steps, learning rate {hp['learning_rate']}, LoRA rank "
                f"{hp['rank']}{_method_settings(settings)}")
    lines += [
        f"World `{result['world']['name']}`; {n} {settings['domain']} removal requests {method}, "
        f"in this order: " + ", ".join(f"`{c}`" for c in result["stream"]) + ".",
        f"{training}; "
        f"evaluation on {base['num_images']} images ({len(eval_cfg['styles'])} styles x {len(eval_cfg['objects'])} "
        f"objects x {len(eval_cfg['seeds'])} seeds, {eval_cfg['num_inference_steps']} steps, guidance "
        f"{eval_cfg['guidance_scale']}). Whole run: {result['seconds'] / 60:.1f} min "
        f"({result['environment'].get('jobs', 1)} worker process(es), {result['environment']['threads']} torch "
        f"thread(s) each" + (f"; each evaluation shared out over {result['environment']['processes']} processes"
                             if result["environment"].get("processes", 1) > 1 else "") + ").",
        DEFINITIONS,
        f"Base model: IRA {_pct(base['ira'])}, CRA {_pct(base['cra'])} "
        f"(accuracy of the {settings['domain']} and the other domain's classifier on the base model's images).",
        "",
        f"Evaluation set: every removed {domain} and a fixed set of kept {domain}s "
        f"({len(eval_cfg[domain + 's'])} {domain}s in all), each drawn with {per_concept // len(eval_cfg['seeds'])} "
        f"{other}s at {len(eval_cfg['seeds'])} seed(s): {per_concept} images per {domain}, so one image is worth "
        f"{100 / per_concept:.1f} points of that {domain}'s accuracy (and {100 / per_concept / n:.2f} points of UA "
        f"once all {n} are removed). IRA: mean over the kept {domain}s; CRA: the {other} classifier on the kept "
        f"{domain}s' images.",
        "",
        f"### After request {n}",
        "",
        *headline(result),
        "",
        "Δ: change against plain sequential unlearning, in percentage points. K/V drift: ||W - W_base||_F / "
        "||W_base||_F over all cross-attention K/V weights. Training steps and seconds: cumulative over the stream "
        "(simultaneous retrains on every request so far, so its cost grows with the stream).",
        "",
    ]
    world = result["world"]
    lines += protection_section(result)
    if has_heldout(result):
        templates = world.get("heldout_templates", [])
        per = next((r["heldout_images"] // max(1, k) for p in result["protocols"].values()
                    for k, r in enumerate(p["rows"]) if k and r.get("heldout_images")), 0)
        lines += [f"UA held-out: UA of the removed {domain}s in {len(templates)} wordings never used in training ("
                  + ", ".join(f"`{t}`" for t in templates) + f"), {per} images per removed {domain}.", ""]
    if any(row["ira"] is None for row in final_rows(result).values()):
        lines += [f"Request {n} removes the last kept {settings['domain']}: IRA and CRA are undefined (n/a) after "
                  f"it; the per-request tables below show them up to request {n - 1}.", ""]
    lines += attack_section(result)
    lines += escalation_section(result)
    metrics = list(METRICS) + ([("ua_heldout", "UA (held-out wordings)")] if has_heldout(result) else [])
    for metric, name in metrics:
        lines += [f"### {name} after each request", ""]
        header = ["protocol"] + [str(k) for k in range(n + 1)]
        rows = [[p["label"]] + [_pct(r.get(metric)) for r in p["rows"]] for p in result["protocols"].values()]
        lines += _table(header, rows) + [""]
    lines += [f"### Per-concept UA (removed {domain} x request)", "",
              "UA of each removed concept after every request (`ua_matrix.png`): a concept whose UA falls again has "
              "come back.", ""]
    for name, protocol in result["protocols"].items():
        matrix = ua_matrix(result, name)
        lines += [f"{protocol['label']}:", ""]
        header = [domain] + [str(k) for k in range(1, n + 1)]
        lines += _table(header, [[f"{i + 1}. {c}"] + ["" if v is None else f"{v:.0f}" for v in matrix[i]]
                                 for i, c in enumerate(result["stream"])]) + [""]
    return "\n".join(lines)


def protection_section(result: dict[str, Any]) -> list[str]:
    """What the protocols were allowed to keep and what retention was scored on (disjoint, ``BenchWorld``), and
    what the retention columns mean."""
    world = result["world"]
    if "protected" not in world:  # results written before the honest protocol
        return ["Protected and scored concepts: not recorded (a run from before the honest protocol; its protocols "
                "may have protected the concepts they were scored on).", ""]
    protected = world["protected"]
    size = sum(len(c) for c in protected.values())
    listing = "; ".join(f"{domain}: " + ", ".join(f"`{c}`" for c in concepts) for domain, concepts in
                        protected.items() if concepts)
    scored = world["scored"]
    lines = [f"Protected and scored concepts (disjoint): the protocols that keep concepts (gradient projection, the "
             f"closed form, retain losses) were given at most these {size}: {listing or 'none'}. Retention is scored "
             f"on {len(scored['style'])} styles and {len(scored['object'])} objects that none of them was given ("
             + ", ".join(f"`{c}`" for c in [*scored["style"], *scored["object"]]) + ")"
             + (", and request prompts use only unscored concepts of the other domain." if not
                world.get("request_prompts_use_evaluated") else "; this world has no unscored concept of one domain, "
                "so its request prompts use scored ones."), ""]
    finals = final_rows(result)
    if any(r.get("image_change") is not None or r.get("cross_removed") is not None for r in finals.values()):
        lines += ["Kept in removed prompts: the other domain's classifier on the removed concepts' own images (the "
                  "object in a removed style's prompt should still be drawn). Kept-image change: distance of the kept "
                  "concepts' images to the base model's at the same seed, in units of the base model's distance "
                  "between two seeds of the same prompt (0: untouched, 1: as different as another sample). Fréchet "
                  "distance: of the kept concepts' image features (the world's feature extractor) to the base's.", ""]
    return lines


def escalation_section(result: dict[str, Any]) -> list[str]:
    """The requests a verified protocol's classifier check sent back, with the settings that then erased (empty
    when no protocol checked with a classifier)."""
    lines: list[str] = []
    for protocol in result["protocols"].values():
        checked = [r for r in protocol["rows"][1:] if (r.get("erasure") or {}).get("check") == "classifier"]
        if not checked:
            continue
        escalated = [r for r in checked if r["erasure"].get("attempts")]
        lines += [f"{protocol['label']}: the classifier check ({checked[0]['erasure']['images']} images per request, "
                  f"seeds apart from the evaluation's) sent back {len(escalated)} of {len(checked)} requests"
                  + (": " if escalated else ".")
                  + "; ".join(f"{r['concept']} (recognised in "
                              + ", then ".join(f"{100 * a['recognized']:.0f}%" for a in r["erasure"]["attempts"])
                              + " of the check images; committed with "
                              + ", ".join(f"{k}={v}" for k, v in (r["erasure"].get("settings") or {}).items())
                              + f", recognised in {100 * r['erasure']['recognized']:.0f}%)" for r in escalated)
                  + ("." if escalated else ""), ""]
    return (["### Classifier-verified requests", ""] + lines) if lines else []


def attack_section(result: dict[str, Any]) -> list[str]:
    """Robust UA per attack after the last request, with what each attack cost (empty when none ran)."""
    finals = {n: r for n, r in final_rows(result).items() if r.get("attacks")}
    if not finals:
        return []
    lines = [f"### Under recovery attacks, after request {len(result['stream'])}", ""]
    rows = []
    for name, row in finals.items():
        for kind, a in row["attacks"].items():
            rows.append([result["protocols"][name]["label"], kind, _pct(a["ua"]), _pct(a["robust_ua"]),
                         _pct(a["robust_ua"] - a["ua"], signed=True), str(a["steps"]), f"{a['seconds']:.1f}"])
    lines += _table(["protocol", "attack", "UA (plain prompts)", "robust UA", "change", "attack steps",
                     "attack s"], rows)
    lines += ["", "Robust UA = 100 - the percent of attack images the classifier names as the removed concept, "
              "averaged over the removed concepts; UA here is the same attack's plain prompts. Attack steps and "
              "seconds: summed over the removed concepts.", ""]
    return lines


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, selected before pyplot loads (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def protocol_method(result: dict[str, Any], name: str) -> str:
    """The erasure method a protocol of ``result`` used: its own (closed-form protocols), else the bench's."""
    protocol = result["protocols"][name]
    return protocol.get("method") or ("closed_form" if name.startswith("closed_form") else
                                      result["settings"]["method"])


def metrics_title(result: dict[str, Any]) -> str:
    """``minicanvas: 12 style requests, methods esd, closed_form``: the methods the plotted protocols used."""
    methods = list(dict.fromkeys(protocol_method(result, name) for name in result["protocols"]))
    return (f"{result['world']['name']}: {len(result['stream'])} {result['settings']['domain']} requests, "
            f"method{'s' if len(methods) > 1 else ''} {', '.join(methods)}")


def plot_metrics(result: dict[str, Any], path: str | os.PathLike) -> None:
    """UA, IRA and CRA against the number of requests, one line per protocol (PNG).

    Args:
        result: a bench result (``run_bench``'s return value, or ``results.json`` read back).
        path: where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["protocols"])
    colors = _colors(names)
    n = len(result["stream"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharex=True)
    for ax, (metric, label) in zip(axes, METRICS):
        for name in names:
            protocol = result["protocols"][name]
            points = [(r["request"], r[metric]) for r in protocol["rows"] if r[metric] is not None]
            style = dict(linestyle="--", linewidth=2.2) if name == REFERENCE else dict(linewidth=1.5)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3.5,
                    color=colors[name], label=protocol["label"], **style)
        ax.set_title(f"{label}: {METRIC_NAMES[metric]}", fontsize=10)
        ax.set_xlabel("number of removal requests")
        ax.set_xticks(range(n + 1))
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy-based score (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(names)), fontsize=8, frameon=False)
    fig.suptitle(metrics_title(result), fontsize=11)
    fig.tight_layout(rect=(0, 0.1 if len(names) > 5 else 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_cost(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Cumulative training steps and seconds against the number of requests: sequential against simultaneous.

    Args:
        result: a bench result (``run_bench``'s return value, or ``results.json`` read back).
        path: where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("sequential", "simultaneous") if n in result["protocols"]] or list(result["protocols"])
    colors = _colors(list(result["protocols"]))
    n = len(result["stream"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    for ax, (key, label) in zip(axes, (("cumulative_steps", "cumulative training steps"),
                                      ("cumulative_seconds", "cumulative training seconds"))):
        for name in names:
            protocol = result["protocols"][name]
            ax.plot([r["request"] for r in protocol["rows"]], [r[key] for r in protocol["rows"]], marker="o",
                    markersize=3.5, color=colors[name], label=protocol["label"])
        ax.set_title(label)
        ax.set_xlabel("number of removal requests")
        ax.set_xticks(range(n + 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# 9 points at 110 dpi: row labels about 14 px tall (6 points at 90 dpi drew them 7 px tall)
UA_MATRIX_FONT, UA_MATRIX_DPI = 9, 110


def plot_ua_matrix(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Heat-map per protocol: UA of each removed concept (rows) after each request (columns) (PNG).

    Args:
        result: a bench result (``run_bench``'s return value, or ``results.json`` read back).
        path: where to write the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(result["protocols"])
    stream = result["stream"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    size = 0.34 * len(stream) + 1.4  # a row per removed concept, tall enough for its 9-point label
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (size + 1.3) + 1.0, rows * (size + 0.6) + 0.5),
                             squeeze=False, layout="constrained")
    image = None
    for ax, name in zip(axes.flat, names):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in ua_matrix(result, name)], float)
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_title(result["protocols"][name]["label"], fontsize=10)
        ax.set_xticks(range(len(stream)), [str(k) for k in range(1, len(stream) + 1)], fontsize=UA_MATRIX_FONT - 1)
        ax.set_yticks(range(len(stream)), stream, fontsize=UA_MATRIX_FONT)
        ax.set_xlabel("after request", fontsize=UA_MATRIX_FONT)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6,
                     label="UA (unlearning accuracy) of the concept (%)")
    fig.suptitle(f"{result['world']['name']}: per-concept UA (unlearning accuracy)", fontsize=11)
    fig.savefig(path, dpi=UA_MATRIX_DPI)
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, title: str | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``metrics.png``, ``cost.png`` and ``ua_matrix.png`` into ``out_dir``.

    Args:
        result: a bench result (``run_bench``'s return value).
        out_dir: the folder to write into (created if missing).
        title: the Markdown section title (see ``markdown``).

    Returns:
        File kind -> path of each written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "metrics_plot": out / "metrics.png",
             "cost_plot": out / "cost.png", "ua_matrix_plot": out / "ua_matrix.png"}
    # allow_nan=False: undefined scores are None (null), never NaN, so the file is strict JSON
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(result, title) + "\n")
    plot_metrics(result, paths["metrics_plot"])
    plot_cost(result, paths["cost_plot"])
    plot_ua_matrix(result, paths["ua_matrix_plot"])
    return paths
