"""Run plans: a stream of removal requests in one YAML file, run in order and resumable.

Example ``PLAN.yaml``::

    model: tiny                 # a world name (minicanvas, tiny, tiny-sdxl, tiny-sd3, tiny-flux), a pipeline folder (relative to this
                                # file) or a Hub id
    output: out/                # the unlearned pipeline folder (relative to this file)
    base_model: user/base       # optional: Hub id of the base for the model card
    strategy: sequential        # or merge / ties / task_arithmetic / uniform / {method: ties, density: 0.4}
    defaults:                   # any request field, for every request
      method: esd
      steps: 200
      learning_rate: 1.0e-4
    requests:
      - concept: van gogh
        domain: style
        regularizers:
          - {name: gradient_projection, retain: [monet]}
          - {name: l2_drift, weight: 1000}
      - concept: cat
        domain: object
        method: ca
        anchor: dog             # fields the request does not know are options of its method

After every request the ledger and adapters are saved atomically in ``<output>/unlearning/``; at the end the
complete folded pipeline is written to ``<output>``. A rerun loads that ledger, checks that the requests it holds
are the plan's first requests with the same settings (it refuses when they differ) and runs only the rest, so an
interrupted run loses at most the request in flight and finishes with the same ledger as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .export import STATE_FILE, UNLEARNING_DIR, check_output_folder, read_saved_state
from .ledger import LEDGER_FILE, RequestRecord, read_ledger_dir
from .merging import MergeStrategy, resolve_strategy, strategy_from_dict, strategy_to_dict
from .model_card import check_base_model
from .objectives import build_objective_config
from .prompts import check_domain
from .recipe import recommended_method, recommended_options, resolve_method
from .regularizers import regularizer_from_dict
from .request import UnlearnRequest, keep_concepts, record_signature
from .trainer import TrainingConfig
from .worlds import get_world

PLAN_KEYS = ("model", "output", "base_model", "strategy", "defaults", "requests", "torch_dtype", "device")
TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(TrainingConfig))
REQUEST_KEYS = (
    "concept", "domain", "method", "seed", "regularizers", "strategy", "prompts", "templates", "keep", *TRAINING_KEYS
)


class PlanError(ValueError):
    """A plan that cannot run (bad field, or a ledger that does not match it), with where and why."""


class _PlanLoader(yaml.SafeLoader):
    """YAML 1.1 reads "1e-4" as a string; plans are written by people who mean a number."""


def _construct_unique_mapping(loader: _PlanLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A key given twice is refused (PyYAML keeps the last one silently, so ``{concept: cat, concept: dog}`` would
    remove "dog")."""
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the base constructor reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_PlanLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
_PlanLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a plan, validated (by building its ``UnlearnRequest``), in the plan's own terms."""

    position: int  # 1-based place in the plan
    concept: str
    domain: str
    method: str
    method_options: dict[str, Any]
    training: TrainingConfig
    seed: int
    regularizers: tuple[dict[str, Any], ...]
    strategy: dict[str, Any]
    prompts: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    # the request's own method options when the recipe chose its method (no 'method:', no training): the recipe's
    # method depends on the model family, which only run_plan knows (``for_family``); None when the plan chose it
    recipe_options: dict[str, Any] | None = None
    # what must survive the request ('keep:', a list in its domain or a map of domain -> concepts), applied to
    # whichever method runs it (``request.keep_concepts``)
    keep: Any = None

    def for_family(self, family: Any) -> PlannedRequest:
        """This request as it runs on a model of ``family``: a recipe-chosen method resolved for it."""
        if self.recipe_options is None:
            return self
        method = recommended_method(family)
        if method == self.method:
            return self
        options = recommended_options(None, method, self.domain, self.recipe_options)
        resolved = dataclasses.replace(self, method=method, method_options=options)
        try:
            resolved.to_request()
        except (TypeError, ValueError) as err:
            raise PlanError(f"request {self.position} ({self.concept!r}) on this model gets the recommended method "
                            f"{method!r}: {err}; name a method in the plan") from None
        return resolved

    def to_request(self) -> UnlearnRequest:
        """The request to run, with fresh regularizer objects (they hold per-request state)."""
        method = build_objective_config(self.method, dict(self.method_options))
        regularizers: Any = [regularizer_from_dict(dict(data)) for data in self.regularizers]
        if self.keep is not None:
            method, regularizers = keep_concepts(self.keep, self.concept, check_domain(self.domain), method,
                                                 regularizers)
        return UnlearnRequest(
            self.concept,
            method,
            domain=self.domain,
            training=self.training,
            seed=self.seed,
            regularizers=regularizers,
            strategy=strategy_from_dict(self.strategy),
            prompts=self.prompts,
            templates=self.templates,
        )

    def signature(self) -> dict[str, Any]:
        """The settings a ledger record of this request must have (compared on resume)."""
        return self.to_request().signature()


@dataclass
class Plan:
    """A validated plan: where to start, where to write, and the requests in order."""

    model: str
    output: Path
    requests: list[PlannedRequest]
    base_model: str | None = None
    torch_dtype: str | None = None
    device: str | None = None
    source: str = "plan"


def _where(source: str, position: int | None, concept: Any = None) -> str:
    if position is None:
        return source
    return f"{source}: request {position}" + (f" ({concept!r})" if isinstance(concept, str) else "")


def _resolve_path(value: str, base_dir: Path | None) -> str:
    if base_dir is None or os.path.isabs(value):
        return value
    candidate = base_dir / value
    return str(candidate) if candidate.exists() or value.startswith((".", "..")) else value


def check_device(device: str, where: str, available: bool = False) -> None:
    """``device`` names a torch device ("cpu", "cuda", "cuda:1", "mps", ...); with ``available``, one this machine
    has. ``PlanError`` naming ``where`` and the value otherwise."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as err:
        raise PlanError(f"{where} {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps'): {err}") \
            from None
    if not available or parsed.type == "cpu":
        return
    module = getattr(torch, parsed.type, None)
    ok = module is not None and hasattr(module, "is_available") and module.is_available()
    if ok and parsed.index is not None and hasattr(module, "device_count"):
        ok = parsed.index < module.device_count()
    if parsed.type == "mps":
        ok = torch.backends.mps.is_available()
    if not ok:
        raise PlanError(f"{where} {device!r} is not available on this machine; use 'cpu' or an available device")


def _strategy(value: Any, where: str) -> dict[str, Any]:
    try:
        if isinstance(value, dict):
            data = dict(value)
            if data.get("strategy", "merge") == "sequential":
                if set(data) != {"strategy"}:
                    raise ValueError(f"strategy 'sequential' takes no settings, got unknown key(s) "
                                     f"{sorted(set(data) - {'strategy'})}; allowed: ['strategy']")
                return strategy_to_dict("sequential")
            data.pop("strategy", None)
            return strategy_to_dict(MergeStrategy(**data))
        return strategy_to_dict(resolve_strategy(value))
    except TypeError as err:
        raise PlanError(f"{where}: bad strategy {value!r}: {err}") from None
    except ValueError as err:
        raise PlanError(f"{where}: {err}") from None


def _regularizer_dicts(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PlanError(f"{where}: regularizers must be a list of names or {{name: ..., settings}} maps, got {value!r}")
    out = []
    for item in value:
        data = {"name": item} if isinstance(item, str) else item
        if not isinstance(data, dict):
            raise PlanError(f"{where}: each regularizer is a name or a {{name: ..., settings}} map, got {item!r}")
        try:
            regularizer_from_dict(dict(data))  # validates the name and every setting
        except (TypeError, ValueError) as err:
            raise PlanError(f"{where}: {err}") from None
        out.append(dict(data))
    return tuple(out)


def _strings(value: Any, field: str, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise PlanError(f"{where}: {field} must be a non-empty list of non-empty strings, got {value!r}")
    return tuple(value)


def _check_field_names(own_options: dict[str, Any], method: Any, where: str) -> None:
    """A request field that is neither a request key nor an option of its method (a typo, most often) is refused
    with every field allowed there and the nearest ones."""
    from .objectives import OBJECTIVES

    if not isinstance(method, str) or method not in OBJECTIVES:
        return  # the method's own error says what is wrong
    method_fields = [f.name for f in dataclasses.fields(OBJECTIVES[method][0]) if f.name != "method"]
    allowed = [*REQUEST_KEYS, *method_fields]
    renamed = OBJECTIVES[method][0].renamed_options  # old names, taken with a FutureWarning when the request is built
    unknown = [k for k in own_options if k not in allowed and k not in renamed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), allowed, n=2, cutoff=0.6)
        if near:
            hints.append(f"{key!r}: did you mean {' or '.join(repr(n) for n in near)}?")
    raise PlanError(f"{where}: unknown field(s) {sorted(map(str, unknown))}" + (f" ({'; '.join(hints)})" if hints else "")
                    + f"; a request takes {', '.join(REQUEST_KEYS)}, and the options of its method {method!r}: "
                    f"{', '.join(method_fields)}")


def _planned_request(
    raw: Any, defaults: dict[str, Any], position: int, plan_strategy: Any, source: str
) -> PlannedRequest:
    if not isinstance(raw, dict):
        raise PlanError(f"{_where(source, position)}: a request is a map with at least 'concept', got {raw!r}")
    fields = {**defaults, **raw}
    concept = fields.get("concept")
    where = _where(source, position, concept)
    if "concept" not in raw:
        raise PlanError(f"{where}: missing 'concept'")
    if not isinstance(concept, str):
        raise PlanError(f"{where}: concept must be a string, got {type(concept).__name__} {concept!r} "
                        "(quote it in YAML: yes/no/on/off and numbers are not strings there)")
    method = resolve_method(fields.get("method"), {k: fields.get(k) for k in ("regularizers", *TRAINING_KEYS)})
    own_options = {k: v for k, v in fields.items() if k not in REQUEST_KEYS}
    options = recommended_options(fields.get("method"), method, fields.get("domain"), own_options)
    recipe_options = own_options if fields.get("method") is None and method == recommended_method() else None
    _check_field_names(own_options, method, where)
    strategy = _strategy(fields.get("strategy", plan_strategy), where)
    regularizers = _regularizer_dicts(fields.get("regularizers"), where)
    prompts = _strings(fields.get("prompts"), "prompts", where)
    templates = _strings(fields.get("templates"), "templates", where)
    try:
        if not isinstance(method, str):
            raise ValueError(f"method must be a method name, got {method!r}")
        planned = PlannedRequest(
            position=position, concept=concept, domain=fields.get("domain"), method=method, method_options=options,
            training=TrainingConfig(**{k: fields[k] for k in TRAINING_KEYS if k in fields}),
            seed=fields.get("seed", 0), regularizers=regularizers, strategy=strategy, prompts=prompts,
            templates=templates, recipe_options=recipe_options, keep=fields.get("keep"),
        )
        request = planned.to_request()  # validates every field once, as pipe.unlearn does
    except (TypeError, ValueError) as err:
        raise PlanError(f"{where}: {err}") from None
    # The plan keeps the request's normalised concept, resolved domain and checked seed.
    return dataclasses.replace(planned, concept=request.concept, domain=request.domain, seed=request.seed)


def parse_plan(
    data: Any, *, source: str = "plan", base_dir: Path | None = None, model: str | None = None,
    output: str | os.PathLike | None = None,
) -> Plan:
    """Validate a plan given as a dict (the parsed YAML). ``model``/``output`` override the plan's own fields;
    relative paths in the plan are relative to ``base_dir`` (the plan file's folder)."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan is a map with 'model', 'output' and 'requests', got {type(data).__name__}")
    unknown = sorted(set(data) - set(PLAN_KEYS))
    if unknown:
        raise PlanError(f"{source}: unknown field(s) {unknown}; allowed: {list(PLAN_KEYS)}")
    model_name = model if model is not None else data.get("model")
    if not isinstance(model_name, str) or not model_name:
        raise PlanError(f"{source}: 'model' must name the model to start from (a world name, a folder or a "
                        "Hub id)")
    if model is None and get_world(model_name) is None:  # a world name wins over a folder of that name
        model_name = _resolve_path(model_name, base_dir)
    out = output if output is not None else data.get("output")
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise PlanError(f"{source}: 'output' must name the folder to write the unlearned pipeline to")
    out_path = Path(out) if output is not None or base_dir is None else base_dir / Path(out)
    if Path(model_name).is_dir() and Path(model_name).resolve() == out_path.resolve():
        raise PlanError(f"{source}: model and output are the same folder ({out_path}); the plan's requests come after "
                        "the model's own, so write them to a new output folder")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PlanError(f"{source}: 'defaults' must be a map of request fields, got {defaults!r}")
    if "concept" in defaults:
        raise PlanError(f"{source}: 'defaults' cannot set 'concept'")
    raw_requests = data.get("requests")
    if not isinstance(raw_requests, list) or not raw_requests:
        raise PlanError(f"{source}: 'requests' must be a non-empty list of requests")
    plan_strategy = data.get("strategy", "sequential")
    requests = [_planned_request(raw, defaults, i, plan_strategy, source) for i, raw in enumerate(raw_requests, 1)]
    strategies = {json.dumps(r.strategy, sort_keys=True) for r in requests}
    if len(strategies) > 1:
        raise PlanError(f"{source}: one ledger composes requests with one strategy; the plan mixes "
                        f"{sorted(strategies)}")
    base_model = data.get("base_model")
    try:
        check_base_model(base_model)
    except (TypeError, ValueError) as err:
        raise PlanError(f"{source}: {err}") from None
    for key in ("torch_dtype", "device"):
        if data.get(key) is not None and not isinstance(data.get(key), str):
            raise PlanError(f"{source}: {key} must be a string, got {data.get(key)!r}")
    if data.get("device") is not None:
        check_device(data["device"], f"{source}: device")
    return Plan(model_name, out_path, requests, base_model, data.get("torch_dtype"), data.get("device"), source)


def load_plan(path: str | os.PathLike, *, model: str | None = None, output: str | os.PathLike | None = None) -> Plan:
    """Read and validate ``PLAN.yaml`` (every request is checked before anything runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan file {path} does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlanLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as err:
        raise PlanError(f"{path} is not UTF-8 text: {err}") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise PlanError(f"{path} is not valid YAML: {' '.join(str(err).split())[:500]}") from None
    return parse_plan(data, source=str(path), base_dir=path.parent, model=model, output=output)


@dataclass
class RunResult:
    """What ``run_plan`` did."""

    pipe: Any
    output: Path
    trained: list[str]  # request ids trained by this run
    skipped: list[str]  # request ids the ledger already held
    saved: bool  # whether the pipeline folder was (re)written


def _mismatch(planned: PlannedRequest, record: RequestRecord, source: str) -> str | None:
    expected, found = planned.signature(), record_signature(record)
    for key in expected:
        if expected[key] != found.get(key):
            return (f"{_where(source, planned.position, planned.concept)} does not match ledger request "
                    f"{record.request_id} ({record.concept!r}): {key} is {json.dumps(expected[key])} in the plan and "
                    f"{json.dumps(found.get(key))} in the ledger; restore the plan or use another output folder")
    return None


def run_plan(
    plan: Plan,
    *,
    pipe: Any = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = print,
    after_request: Callable[[PlannedRequest, RequestRecord], None] | None = None,
) -> RunResult:
    """Run the plan's requests that the output's ledger does not hold yet, then write the folded pipeline folder.

    Args:
        plan: from ``load_plan``/``parse_plan``.
        pipe: a pipeline to use instead of loading ``plan.model`` (it must be that model).
        progress: progress bars during training (default: the pipeline's setting).
        log: where one line per request goes (None: silent).
        after_request: called after each request is trained and saved (for callers that report or stop).
    """
    from .families import family_of
    from .pipelines import load_pipeline

    say = log or (lambda _: None)
    if pipe is None:
        if plan.device is not None:
            check_device(plan.device, f"{plan.source}: device", available=True)  # before the model loads
        pipe = load_pipeline(plan.model, torch_dtype=plan.torch_dtype, device=plan.device)
    checkpoint = plan.output / UNLEARNING_DIR
    own = [(r.request_id, r.adapter.get("sha256")) for r in pipe.unlearning_ledger.requests]
    if (checkpoint / LEDGER_FILE).is_file():
        ledger, _ = read_ledger_dir(checkpoint)
        if [(r.request_id, r.adapter.get("sha256")) for r in ledger.requests[: len(own)]] != own:
            raise PlanError(
                f"{checkpoint} does not continue the ledger of model {plan.model} (its first requests differ); "
                "use another output folder"
            )
        if ledger.ids() != pipe.unlearning_ledger.ids():
            pipe.load_unlearning(checkpoint, replace=True)  # checks the base fingerprint and every adapter
    else:
        check_output_folder(plan.output)  # refuse a foreign non-empty folder before any training
    done = pipe.unlearning_ledger.requests[len(own):]
    requests = [planned.for_family(family_of(pipe)) for planned in plan.requests]
    total = len(requests)
    if len(done) > total:
        raise PlanError(f"{checkpoint} holds {len(done)} requests of this plan, but the plan has only {total}; "
                        "use another output folder")
    skipped = []
    for planned, record in zip(requests, done):
        problem = _mismatch(planned, record, plan.source)
        if problem:
            raise PlanError(problem)
        skipped.append(record.request_id)
        say(f"[{planned.position}/{total}] {planned.concept!r}: already in the ledger as {record.request_id}, skipped")
    trained = []
    for planned in requests[len(done):]:
        record = pipe.unlearn(planned.to_request(), progress=progress)
        pipe.save_unlearning(checkpoint)  # atomic: an interruption from here on loses nothing
        trained.append(record.request_id)
        say(f"[{planned.position}/{total}] {planned.concept!r}: removed as {record.request_id} in "
            f"{record.seconds:.1f}s (final loss {record.final_loss:.4g})")
        if after_request is not None:
            after_request(planned, record)
    saved = False
    if trained or not _folder_up_to_date(plan.output, pipe.unlearning_ledger.ids()):
        pipe.save_unlearned(plan.output, base_model=plan.base_model)
        saved = True
        say(f"saved the unlearned pipeline ({len(pipe.unlearning_ledger.requests)} requests folded) to {plan.output}")
    else:
        say(f"nothing to do: all {total} requests are in the ledger and {plan.output} is up to date")
    return RunResult(pipe, plan.output, trained, skipped, saved)


def _folder_up_to_date(output: Path, ids: list[str]) -> bool:
    if not (output / UNLEARNING_DIR / STATE_FILE).is_file() or not (output / "model_index.json").is_file():
        return False
    try:
        return read_saved_state(output).get("requests") == ids
    except ValueError:
        return False


__all__ = [
    "Plan", "PlanError", "PlannedRequest", "RunResult", "load_plan", "parse_plan", "record_signature", "run_plan",
]
