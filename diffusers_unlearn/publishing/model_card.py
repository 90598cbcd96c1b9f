"""The model card of an unlearned pipeline: YAML front matter for the Hub, a Markdown body for people.

Concept names, retain lists and anchors are user text. In the front matter every string that is not plainly safe is
written double-quoted on one line (line breaks, ``---``, NEL and other separators escaped), and the result is parsed
back before use, so ``ModelCard.load`` returns every concept exactly. In the body, user text is escaped for Markdown
tables and HTML (``|``, line breaks, ``<``, ``&``, backticks, emphasis and link characters become entities).
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from .._validation import check_number, check_repo_id
from .._version import __version__
from ..engine.ledger import Ledger, RequestRecord
from ..kv.merging import strategy_from_dict
from ..regularizers import REGULARIZERS

TAGS = ["diffusers", "text-to-image", "concept-unlearning"]
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._/+-]*")  # strings written without quotes when YAML reads them back so
_MAX_CELL = 200  # characters of user text per table cell (the YAML keeps the full text)


class _CardDumper(yaml.SafeDumper):
    """Writes any string that is not plain text double-quoted, so that every special character is escaped."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = None if _PLAIN.fullmatch(value) and value == value.strip() else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_CardDumper.add_representer(str, _represent_str)


def card_yaml(data: Mapping[str, Any]) -> str:
    """YAML for the front matter: one line per scalar (no folding), checked to load back to ``data``."""
    text = yaml.dump(dict(data), Dumper=_CardDumper, sort_keys=False, allow_unicode=True, width=2**30)
    if yaml.safe_load(text) != dict(data):  # defensive: never write metadata that reads back differently
        raise ValueError("model card metadata does not survive a YAML round trip")
    return text


class UnlearnModelCard(ModelCard):
    """A ``huggingface_hub.ModelCard`` whose front matter is written with ``card_yaml`` (safe for hostile text).

    ``ModelCard.load`` reads it back like any card.
    """

    @property
    def content(self) -> str:
        return f"---\n{card_yaml(self.data.to_dict())}---\n{self.text}"

    @content.setter
    def content(self, content: str) -> None:
        ModelCard.content.fset(self, content)


_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
# Markdown punctuation (emphasis, links, images, code spans, strike-through, headings) gets a backslash escape;
# what the backslash cannot neutralise (table pipes, HTML, entities, math) becomes a numeric entity.
_BACKSLASH = set("\\`*_[]~#!")
_ENTITY = set("|<>&$")
_SAFE_PATH = re.compile(r"[A-Za-z0-9._/-]+")


def escape_markdown(text: object, limit: int | None = _MAX_CELL) -> str:
    """User text as inert Markdown for one table cell: one line, no markup, no HTML; ``limit`` characters at most."""
    text = _LINE_BREAKS.sub(" ", str(text))
    text = "".join(" " if unicodedata.category(ch)[0] == "C" and ch != " " else ch for ch in text).strip()
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    out = []
    for ch in text:
        out.append(f"&#{ord(ch)};" if ch in _ENTITY else f"\\{ch}" if ch in _BACKSLASH else ch)
    return "".join(out) or "&#32;"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def _defaults(name: str) -> dict[str, Any]:
    cls = REGULARIZERS.get(name)
    if cls is None:
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def regularizer_summary(regularizers: list[dict[str, Any]]) -> str:
    """``name(setting=value, ...)`` for each regularizer of a record: the settings that differ from the defaults."""
    if not regularizers:
        return "none"
    parts = []
    for reg in regularizers:
        name = str(reg.get("name", "?"))
        if name == "closed_form" and name not in REGULARIZERS:  # the solve's report, not a regularizer
            report = reg.get("report") if isinstance(reg.get("report"), Mapping) else {}
            kept = report.get("protected")
            parts.append("none (solved in closed form" + (f", keeping {len(kept)} concepts)"
                                                           if isinstance(kept, list) else ")"))
            continue
        defaults = _defaults(name)
        settings = {k: v for k, v in reg.items() if k not in ("name", "report") and v not in (None, [], {})
                    and not (k in defaults and _same(defaults[k], v))}
        inner = ", ".join(f"{k}={_format_value(v)}" for k, v in settings.items())
        parts.append(f"{name}({inner})" if inner else name)
    return "; ".join(parts)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out.append((prefix, value))


def _is_figure(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_figure(v) for v in value)
    if isinstance(value, (bool, str)) or value is None:
        return True
    try:
        check_number(value, "figure")
    except ValueError:
        return False
    return True


def check_figures(evaluation: Mapping[str, Any]) -> None:
    """Every evaluation figure is a finite number, a string, a yes/no (or a list of them); nested maps name groups.
    A NaN, an infinity or an arbitrary object would be written into the card as "nan" or an object's repr."""
    figures: list[tuple[str, Any]] = []
    _flatten("", evaluation, figures)
    for name, value in figures:
        if not _is_figure(value):
            raise ValueError(f"evaluation[{name!r}] must be a finite number, a string, True/False or a list of them, "
                             f"got {value!r:.200}")


def evaluation_rows(ledger: Ledger, evaluation: Mapping[str, Any] | None) -> list[tuple[str, str, str]]:
    """(scope, metric, value) for every figure computed: each record's ``evaluation`` and the overall figures."""
    rows: list[tuple[str, Any, Any]] = []
    for record in ledger.requests:
        figures: list[tuple[str, Any]] = []
        _flatten("", record.evaluation or {}, figures)
        rows += [(f"{record.request_id} ({record.concept})", k, v) for k, v in figures]
    figures = []
    _flatten("", evaluation or {}, figures)
    rows += [("all requests", k, v) for k, v in figures]
    return [(scope, metric, _format_value(value)) for scope, metric, value in rows]


def robustness_lines(results: Any) -> list[str]:
    """The card's robustness section from recovery-attack results (``AttackResult.to_dict()`` mappings), if any."""
    if results is None:
        return []
    if isinstance(results, Mapping) or not isinstance(results, (list, tuple)) or not all(
            isinstance(r, Mapping) and {"kind", "concept", "accuracy", "plain_accuracy"} <= set(r) for r in results):
        raise ValueError("evaluation['robustness'] must be a list of attack results (AttackResult.to_dict(): kind, "
                         f"concept, accuracy, plain_accuracy, ...), got {results!r:.200}")
    lines = ["", "## Robustness to recovery attacks", "",
             "Percent of images a classifier names as the removed concept, with its plain prompts and under each "
             "attack (`du.evaluation.attack`); robust UA = 100 - attack accuracy.", "",
             "| concept | attack | plain prompts | under attack | robust UA | attack cost |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        cost = f"{int(r.get('steps', 0))} steps, {float(r.get('seconds', 0.0)):.1f} s"
        lines.append(f"| {escape_markdown(r['concept'])} | {escape_markdown(r['kind'])} | "
                     f"{float(r['plain_accuracy']):.1f} | {float(r['accuracy']):.1f} | "
                     f"{100.0 - float(r['accuracy']):.1f} | {cost} |")
    return lines


def _strategy_text(ledger: Ledger) -> str:
    if not ledger.requests:
        return "none (no requests)"
    strategy = strategy_from_dict(ledger.requests[0].strategy)
    steps = {record.steps == 0 for record in ledger.requests}  # a closed-form request is solved, in 0 steps
    served = "solved" if steps == {True} else "trained" if steps == {False} else "trained or solved"
    if strategy == "sequential":
        return f"sequential: each request was {served} on top of the earlier ones; their changes add up"
    scale = "grows with the number of requests" if strategy.scale is None else f"{strategy.scale:g}"
    return (f"merge ({strategy.method}, density {strategy.density:g}, scale {scale}): each request was {served} "
            "from the base and their changes were merged")


def _date(record: RequestRecord) -> str:
    return str(record.created_at)[:10]


def _method(record: RequestRecord) -> str:
    anchor = record.method_config.get("anchor") if isinstance(record.method_config, dict) else None
    return f"{record.method} (anchor: {anchor})" if anchor else record.method


def _erasure_text(record: RequestRecord) -> str:
    """The erasure check's verdict: how far the concept's prediction moved (``engine/erasure_check.py``), or how often a
    classifier still recognised it (``engine/classifier_check.py``)."""
    figures = record.erasure or {}
    if "erased" not in figures:
        return "not checked"
    verdict = "erased" if figures["erased"] else "**NOT erased**"
    if figures.get("check") == "classifier":
        from ..engine.classifier_check import ClassifierCheck  # at call time: the card's import stays light

        reading = f"classifier: {ClassifierCheck.verdict(figures)}"
    else:
        reading = f"shift {float(figures['target_shift']):.2f}, needs {float(figures['min_shift']):g}"
    attempts = figures.get("attempts") or []
    if attempts:  # escalation (engine/escalation.py): the settings that did not erase came first
        reading += f"; {len(attempts)} weaker attempt(s) undone"
    return f"{verdict} ({reading})"


def check_base_model(base_model: object) -> str | None:
    """None, or a Hub model id ("name" or "namespace/name"); anything else raises, naming the value."""
    return None if base_model is None else check_repo_id(base_model, "base_model")


def build_model_card(
    ledger: Ledger,
    *,
    base_model: str | None = None,
    pipeline_class: str = "StableDiffusionPipeline",
    lora_exports: Mapping[str, Mapping[str, Any]] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> UnlearnModelCard:
    """The card of a pipeline with the ledger's requests folded in.

    Args:
        ledger: the requests, in order.
        base_model: Hub id of the model before unlearning (front matter ``base_model``); None when unknown.
        pipeline_class: the diffusers class that loads the folder.
        lora_exports: per request id, what ``export_lora`` wrote (file, kind, ranks), listed in the body.
        evaluation: overall evaluation figures (nested dicts allowed); per-request figures come from the records.
            Its ``"robustness"`` entry, a list of recovery-attack results, becomes a section of its own.
    """
    if evaluation is not None and not isinstance(evaluation, Mapping):
        raise TypeError(f"evaluation must be a map of figure names to values, got {evaluation!r:.200}")
    evaluation = dict(evaluation or {})
    robustness = robustness_lines(evaluation.pop("robustness", None))
    check_figures(evaluation)
    concepts = [c for r in ledger.requests for c in r.concepts]  # every concept of a request of several
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=list(TAGS),
        removed_concepts=concepts,
        unlearning={
            "library": "diffusers-unlearn",
            "version": __version__,
            "base_fingerprint": ledger.base_fingerprint,
            "requests": [
                {"id": r.request_id, "concept": r.concept,
                 **({"concepts": list(r.concepts)} if len(r.concepts) > 1 else {}), "domain": r.domain,
                 "method": r.method, "erased": r.erasure.get("erased")}
                for r in ledger.requests
            ],
        },
    )
    check_base_model(base_model)  # a Hub id: safe in the link below without escaping
    # SD3 / Flux pipelines carry a transformer whose joint blocks' text-stream projections are adapted
    transformer = pipeline_class.startswith(("StableDiffusion3", "Flux"))
    component = "transformer" if transformer else "UNet"
    layers = ("transformer's text-stream key/value projections (joint blocks' add_k_proj / add_v_proj)"
              if transformer else "UNet's cross-attention key/value projections")
    base_link = (f"[{base_model}](https://huggingface.co/{base_model})" if base_model
                 else "a local checkpoint (no Hub id recorded)")
    lines = [
        "# Unlearned text-to-image pipeline",
        "",
        f"This `{pipeline_class}` had {len(concepts)} concept(s) removed with "
        "diffusers-unlearn (continual concept unlearning): each removal request became one "
        f"constrained adapter on the {layers}, recorded in a ledger. The "
        f"requests are folded into the {component} weights, so the folder loads with plain diffusers.",
        "",
        f"- Base model: {base_link}",
        f"- Base K/V fingerprint: `{ledger.base_fingerprint}`",
        f"- Composition: {_strategy_text(ledger)}",
        "",
        "## Removed concepts",
        "",
    ]
    if ledger.requests:
        lines += [
            "| # | request | concept | domain | method | regularizers | date | steps | erasure check |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for position, record in enumerate(ledger.requests, start=1):
            cells = [
                str(position),
                escape_markdown(record.request_id),
                escape_markdown(record.concept),
                escape_markdown(record.domain),
                escape_markdown(_method(record)),
                escape_markdown(regularizer_summary(record.regularizers), limit=400),
                escape_markdown(_date(record)),
                str(int(record.steps)),
                _erasure_text(record),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No concept has been removed yet.")
    rows = evaluation_rows(ledger, evaluation)
    if rows:
        lines += ["", "## Evaluation", "", "| scope | metric | value |", "| --- | --- | --- |"]
        lines += [f"| {escape_markdown(s)} | {escape_markdown(m)} | {escape_markdown(v)} |" for s, m, v in rows]
    lines += robustness
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("THIS_REPO_OR_FOLDER")  # the removals are in the {component} weights',
        "```",
        "",
        "## Audit and rollback",
        "",
        "The ledger (`unlearning/ledger.json`), every request's own adapter (`unlearning/adapters/`) and the base "
        "K/V weights (`unlearning/base_kv.safetensors`) travel with the weights. With diffusers-unlearn:",
        "",
        "```python",
        "import diffusers_unlearn as du",
        "",
        'pipe = du.attach(DiffusionPipeline.from_pretrained("THIS_REPO_OR_FOLDER"))  # restores base, ledger, adapters',
        'with pipe.audit("r0001"):  # only that request active; mode="without": all but it',
        "    ...",
        'pipe.rollback("r0001")  # re-folds the base with the remaining requests',
        "```",
    ]
    if lora_exports:
        lines += [
            "",
            "Each request is also a LoRA in diffusers' format that applies to the **base** model (not to these "
            "folded weights), for audits without this package:",
            "",
            "| request | file | kind | rank |",
            "| --- | --- | --- | --- |",
        ]
        for request_id, info in lora_exports.items():
            ranks = f"{info.get('min_rank')}-{info.get('max_rank')}" if info.get("min_rank") != info.get(
                "max_rank") else str(info.get("max_rank"))
            kind = "LoRA" if info.get("kind") == "lora" else "masked dense delta, exact LoRA form"
            file = str(info.get("file", ""))
            file = f"`{file}`" if _SAFE_PATH.fullmatch(file) else escape_markdown(file, None)
            lines.append(f"| {escape_markdown(request_id)} | {file} | {kind} | {ranks} |")
        lines += [
            "",
            "```python",
            'base.load_lora_weights("THIS_REPO_OR_FOLDER", subfolder="unlearning/lora",',
            '                        weight_name="r0001.safetensors")',
            "```",
        ]
    return UnlearnModelCard("\n".join(["---", card_yaml(data.to_dict()) + "---", *lines, ""]))


__all__ = ["TAGS", "UnlearnModelCard", "build_model_card", "card_yaml", "escape_markdown", "regularizer_summary"]
