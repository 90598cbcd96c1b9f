"""Run plans: a stream of removal requests in one YAML file, run in order and resumable.

Example ``PLAN.yaml``::

    model: tiny                 # a world name (minicanvas, tiny, tiny-sdxl, tiny-sd3, tiny-flux), a pipeline
                                # folder (relative to this file) or a Hub id
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
      - concept: [monet, picasso]   # several concepts: one request, one ledger entry
        domain: style

A request without ``method:`` and without training fields gets the recommended method of the model it runs on
(``engine/defaults.py``), resolved when the plan runs; the plan's shape and field names are checked without the engine
first (``plan_format.py``). After every request the ledger and adapters are saved atomically in
``<output>/unlearning/``; at the end the complete folded pipeline is written to ``<output>``. A rerun loads that
ledger, checks that the requests it holds are the plan's first requests with the same settings (it refuses when they
differ) and runs only the rest, so an interrupted run loses at most the request in flight and finishes with the
same ledger as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .engine.defaults import recommended_method
from .publishing.export import STATE_FILE, UNLEARNING_DIR, check_output_folder, read_saved_state
from .families.registry import family_of
from .engine.ledger import LEDGER_FILE, RequestRecord, read_ledger_dir
from .kv.merging import MergeStrategy, resolve_strategy, strategy_from_dict, strategy_to_dict
from .publishing.model_card import check_base_model
from .objectives import OBJECTIVES
from .pipelines import load_pipeline
from .plan_format import REQUEST_KEYS, TRAINING_KEYS, PlanError, check_plan_fields, location, read_plan_file
from .regularizers import regularizer_from_dict
from .engine.request import UnlearnRequest, record_signature, resolve_request
from .engine.training_config import TrainingConfig
from .worlds import get_world

if TYPE_CHECKING:
    from .families.registry import ModelFamily


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a plan in the plan's own terms, checked at parse time by resolving it (``to_request``).

    ``method`` None (no ``method:``): the default method of the model it runs on (``defaults.default_method``),
    known only when the plan runs. ``method_options`` and ``training`` are what the plan gives; the defaults apply
    in ``to_request``.

    Attributes:
        position: the request's 1-based place in the plan (how errors name it).
        concept: what to remove, normalised as the request normalises it: a string, or a tuple of the concepts one
            request removes together.
        domain: the prompt domain, resolved ("concept" when the plan gives none).
        method: the method's name, or None for the default method of the model.
        method_options: the request's fields that are options of its method (``anchor: dog``).
        training: the plan's training fields as a ``TrainingConfig``; None when it gives none.
        seed: the request's seed.
        regularizers: one ``{name: ..., settings}`` map per regularizer (objects are built fresh per run).
        strategy: the merge strategy as ``merging.strategy_to_dict`` writes it.
        prompts: explicit prompts, or None.
        templates: explicit templates, or None.
        keep: what must survive the request (``keep:``), or None.
    """

    position: int  # 1-based place in the plan
    concept: str | tuple[str, ...]
    domain: str
    method: str | None
    method_options: dict[str, Any]
    training: TrainingConfig | None  # None: the plan gives no training field
    seed: int
    regularizers: tuple[dict[str, Any], ...]
    strategy: dict[str, Any]
    prompts: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    # what must survive the request ('keep:', a list in its domain or a map of domain -> concepts), applied to
    # whichever method runs it (``request.keep_concepts``)
    keep: Any = None

    def to_request(self, family: ModelFamily | None = None) -> UnlearnRequest:
        """The request to run on a model of ``family``, with fresh regularizer objects (they hold per-request
        state).

        Args:
            family: the family of the model it runs on (``families.family_of(pipe)``): it picks the default method
                when the plan names none. None: not known yet (parse time).

        Returns:
            The validated ``UnlearnRequest``.

        Raises:
            ValueError, TypeError: a field the request refuses (``request.resolve_request``).
        """
        return resolve_request(
            self.concept if isinstance(self.concept, str) else list(self.concept),
            self.method,
            domain=self.domain,
            family=family,
            regularizers=[regularizer_from_dict(dict(data)) for data in self.regularizers],
            keep=self.keep,
            training=self.training,
            seed=self.seed,
            strategy=strategy_from_dict(self.strategy),
            prompts=self.prompts,
            templates=self.templates,
            **self.method_options,
        )

    def signature(self, family: ModelFamily | None = None) -> dict[str, Any]:
        """The settings a ledger record of this request must have (compared on resume).

        Args:
            family: as in ``to_request``.

        Returns:
            ``UnlearnRequest.signature`` of the resolved request.
        """
        return self.to_request(family).signature()


@dataclass
class Plan:
    """A validated plan: where to start, where to write, and the requests in order (``load_plan``, ``parse_plan``).

    Attributes:
        model: a world name, a pipeline folder or a Hub id (relative folders already resolved).
        output: the folder the unlearned pipeline is written to; its ``unlearning/`` holds the resumable ledger.
        requests: the requests, in plan order.
        base_model: the base model's Hub id for the model card, or None.
        torch_dtype: the dtype to load the model in (e.g. "float16"), or None for the default.
        device: the torch device to run on, or None for the loader's default.
        source: how errors name the plan (its path).
    """

    model: str
    output: Path
    requests: list[PlannedRequest]
    base_model: str | None = None
    torch_dtype: str | None = None
    device: str | None = None
    source: str = "plan"


def _resolve_path(value: str, base_dir: Path | None) -> str:
    if base_dir is None or os.path.isabs(value):
        return value
    candidate = base_dir / value
    return str(candidate) if candidate.exists() or value.startswith((".", "..")) else value


def check_device(device: str, where: str, available: bool = False) -> None:
    """Check that ``device`` names a torch device ("cpu", "cuda", "cuda:1", "mps", ...) and, with ``available``,
    one this machine has: a plan is refused at parse time for a misspelled device, before the model loads for a
    missing one.

    Args:
        device: the device string.
        where: how the error names the value (e.g. ``"PLAN.yaml: device"``).
        available: also check that this machine has it ("cpu" always does).

    Raises:
        PlanError: not a torch device, or (with ``available``) not on this machine.
    """
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


def _method_fields(method: str) -> list[str] | None:
    """The option names of a registered method (its config's fields, and the former names it still takes with a
    FutureWarning); None for an unknown name."""
    if method not in OBJECTIVES:
        return None
    config_class = OBJECTIVES[method][0]
    return [f.name for f in dataclasses.fields(config_class)] + list(config_class.renamed_options)


def _planned_request(
    raw: dict[str, Any], defaults: dict[str, Any], position: int, plan_strategy: Any, source: str
) -> PlannedRequest:
    """One request, its shape already checked (``check_plan_fields``), validated by resolving it once."""
    fields = {**defaults, **raw}
    at = location(source, position, fields["concept"])
    method = fields.get("method")
    strategy = _strategy(fields.get("strategy", plan_strategy), at)
    regularizers = _regularizer_dicts(fields.get("regularizers"), at)
    prompts = _strings(fields.get("prompts"), "prompts", at)
    templates = _strings(fields.get("templates"), "templates", at)
    training = {k: fields[k] for k in TRAINING_KEYS if k in fields}
    try:
        if method is not None and not isinstance(method, str):
            raise ValueError(f"method must be a method name, got {method!r}")
        planned = PlannedRequest(
            position=position, concept=fields["concept"], domain=fields.get("domain"), method=method,
            method_options={k: v for k, v in fields.items() if k not in REQUEST_KEYS},
            training=TrainingConfig(**training) if training else None, seed=fields.get("seed", 0),
            regularizers=regularizers, strategy=strategy, prompts=prompts, templates=templates, keep=fields.get("keep"),
        )
        request = planned.to_request()  # validates every field once, as pipe.unlearn does
    except (TypeError, ValueError) as err:
        raise PlanError(f"{at}: {err}") from None
    # The plan keeps the request's normalised concept(s), resolved domain and checked seed.
    concept = request.concept if len(request.concepts) == 1 else tuple(request.concepts)
    return dataclasses.replace(planned, concept=concept, domain=request.domain, seed=request.seed)


def parse_plan(
    data: Any, *, source: str = "plan", base_dir: Path | None = None, model: str | None = None,
    output: str | os.PathLike | None = None,
) -> Plan:
    """Validate a plan given as a dict (the parsed YAML): its shape and field names (``check_plan_fields``), then
    every request, resolved as it would run.

    Args:
        data: the parsed YAML.
        source: how errors name the plan (its path).
        base_dir: the plan file's folder; relative paths in the plan are relative to it.
        model: overrides the plan's ``model``.
        output: overrides the plan's ``output``.

    Returns:
        The ``Plan``.

    Raises:
        PlanError: a field that cannot run, named with where it is and what is allowed.

    Examples:
        >>> plan = parse_plan({"model": "tiny", "output": "out", "requests": [{"concept": "van gogh", "steps": 1}]})
        >>> plan.requests[0].method is None, plan.requests[0].training.steps  # the method is the model's default
        (True, 1)
        >>> parse_plan({"model": "tiny", "output": "out", "requests": [{"concept": "cat", "stpes": 5}]})
        Traceback (most recent call last):
        diffusers_unlearn.plan_format.PlanError: plan: request 1 ('cat'): unknown field(s) ['stpes']
        ('stpes': did you mean 'steps'?); ...
    """
    check_plan_fields(data, source=source, method_fields=_method_fields)
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
    plan_strategy = data.get("strategy", "sequential")
    requests = [_planned_request(raw, defaults, i, plan_strategy, source) for i, raw in enumerate(data["requests"], 1)]
    strategies = {json.dumps(r.strategy, sort_keys=True) for r in requests}
    if len(strategies) > 1:
        raise PlanError(f"{source}: one ledger composes requests with one strategy; the plan mixes "
                        f"{sorted(strategies)}")
    base_model = data.get("base_model")
    try:
        check_base_model(base_model)
    except (TypeError, ValueError) as err:
        raise PlanError(f"{source}: {err}") from None
    if data.get("device") is not None:
        check_device(data["device"], f"{source}: device")
    return Plan(model_name, out_path, requests, base_model, data.get("torch_dtype"), data.get("device"), source)


def load_plan(path: str | os.PathLike, *, model: str | None = None, output: str | os.PathLike | None = None) -> Plan:
    """Read and validate ``PLAN.yaml`` (every request is checked before anything runs): ``read_plan_file`` then
    ``parse_plan``.

    Args:
        path: the plan file; relative paths in it are relative to its folder.
        model: overrides the plan's ``model`` (as given, not relative to the plan's folder).
        output: overrides the plan's ``output`` (as given).

    Returns:
        The ``Plan``, ready for ``run_plan``.

    Raises:
        FileNotFoundError: no file at ``path``.
        PlanError: the file is not valid YAML, or a field cannot run (named with where it is and what is allowed).
    """
    path = Path(path)
    return parse_plan(read_plan_file(path), source=str(path), base_dir=path.parent, model=model, output=output)


@dataclass
class RunResult:
    """What ``run_plan`` did.

    Attributes:
        pipe: the pipeline, with every request of the plan in its ledger.
        output: the plan's output folder.
        trained: the request ids this run trained.
        skipped: the request ids the output's ledger already held (an earlier, possibly interrupted run).
        saved: whether this run (re)wrote the pipeline folder.
    """

    pipe: Any
    output: Path
    trained: list[str]  # request ids trained by this run
    skipped: list[str]  # request ids the ledger already held
    saved: bool  # whether the pipeline folder was (re)written


def _mismatch(planned: PlannedRequest, request: UnlearnRequest, record: RequestRecord, source: str) -> str | None:
    expected, found = request.signature(), record_signature(record)
    for key in expected:
        if expected[key] != found.get(key):
            return (f"{location(source, planned.position, planned.concept)} does not match ledger request "
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
        after_request: called with the planned request and its ledger record after each request is trained and
            saved (for callers that report or stop).

    Returns:
        The ``RunResult``: the pipeline, and which requests were trained, skipped and saved.

    Raises:
        PlanError: the output folder holds a ledger that does not continue the model's or that differs from the
            plan's first requests (the message names the field), or a foreign non-empty folder; a device that is
            not available; a request whose default method on this model refuses its options.

    Examples:
        Run a one-request plan on the tiny test pipeline, then run it again: the rerun finds the request in the
        output's ledger and trains nothing (an interrupted run resumes the same way).

        >>> import tempfile
        >>> folder = tempfile.TemporaryDirectory()
        >>> plan = parse_plan({"model": "tiny", "output": folder.name + "/out",
        ...                    "requests": [{"concept": "van gogh", "domain": "style", "steps": 1}]})
        >>> result = run_plan(plan, progress=False, log=None)
        >>> result.trained, result.skipped, result.saved
        (['r0001'], [], True)
        >>> again = run_plan(plan, progress=False, log=None)
        >>> again.trained, again.skipped, again.saved
        ([], ['r0001'], False)
        >>> folder.cleanup()
    """
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
    family = family_of(pipe)
    requests = [(planned, _request_on(planned, family, plan.source)) for planned in plan.requests]
    total = len(requests)
    if len(done) > total:
        raise PlanError(f"{checkpoint} holds {len(done)} requests of this plan, but the plan has only {total}; "
                        "use another output folder")
    skipped = []
    for (planned, request), record in zip(requests, done):
        problem = _mismatch(planned, request, record, plan.source)
        if problem:
            raise PlanError(problem)
        skipped.append(record.request_id)
        say(f"[{planned.position}/{total}] {_label(planned)!r}: already in the ledger as {record.request_id}, skipped")
    trained = []
    for planned, request in requests[len(done):]:
        record = pipe.unlearn(request, progress=progress)
        pipe.save_unlearning(checkpoint)  # atomic: an interruption from here on loses nothing
        trained.append(record.request_id)
        say(f"[{planned.position}/{total}] {_label(planned)!r}: removed as {record.request_id} in "
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


def _request_on(planned: PlannedRequest, family: ModelFamily, source: str) -> UnlearnRequest:
    """``planned`` resolved for the model it runs on; a request whose default method there refuses its options is
    reported as a plan error (name a method in the plan)."""
    try:
        return planned.to_request(family)
    except (TypeError, ValueError) as err:
        if planned.method is not None:
            raise
        raise PlanError(f"{location(source, planned.position, planned.concept)} on this model gets the recommended "
                        f"method {recommended_method(family)!r}: {err}; name a method in the plan") from None


def _label(planned: PlannedRequest) -> str:
    """The planned request's concept, or its concepts joined by ", "."""
    return planned.concept if isinstance(planned.concept, str) else ", ".join(planned.concept)


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
