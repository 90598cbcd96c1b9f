"""``diffusers-unlearn unlearn``: remove one concept (or several, as one request) from a model or an unlearned folder
and save the result.

On a world with a calibrated recipe (``minicanvas``) the request uses the world's prompts, method settings,
training settings and regularizers (what the demo does); every flag given overrides its part of the recipe.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import (MODEL_HELP, add_loading_options, add_quiet, check_writable, default_text, finite_float, load,
                      short, working)


def register(subparsers: argparse._SubParsersAction) -> None:
    gp_neighbors = default_text("regularizers/projection.py", "GradientProjection", "neighbors", prefix="")
    parser = subparsers.add_parser(
        "unlearn", help="remove one concept (or several in one request) and save the unlearned pipeline folder",
        description=__doc__,
        epilog="examples:\n"
        "  diffusers-unlearn unlearn minicanvas --concept 'neon lines' --domain style --out out/\n"
        "  diffusers-unlearn unlearn minicanvas --concept 'neon lines,ink sketch' --concept pastel --domain style "
        "--out out/\n"
        "  diffusers-unlearn unlearn tiny --concept 'van gogh' --domain style --retain monet --out out/\n"
        "  diffusers-unlearn unlearn tiny --concept cat --regularizer 'gradient_projection:keep=[dog],neighbors=0' "
        "--regularizer l2_drift:weight=1000 --out out/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL_OR_FOLDER", help=MODEL_HELP)
    parser.add_argument("--concept", required=True, action="append", metavar="CONCEPTS",
                        help="the concept to remove, e.g. 'van gogh'; several (comma-separated, or the flag repeated) "
                        "are removed by one request: one ledger entry, one solve or training run")
    parser.add_argument("--out", required=True,
                        help="folder to write the unlearned pipeline to (new, empty, or an unlearned folder; "
                             "MODEL_OR_FOLDER itself updates it)")
    parser.add_argument("--method", default=None,
                        help="erasure method registered with du.register_objective (default: the recommended one, "
                        "closed_form on SD/SDXL and esd on SD3/Flux; esd when training or regularizer flags are "
                        "given; a world's recipe where it has one); an unknown name is refused with the registered "
                        "list")
    parser.add_argument("--anchor", default=None, help="anchor concept (method ca)")
    parser.add_argument("--domain", default=None,
                        help="picks the prompt templates: style, object or concept (default); a world with a recipe "
                        "(minicanvas) needs style or object and uses its own prompts for them")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's, else "
                        "TrainingConfig's)")
    parser.add_argument("--learning-rate", type=finite_float, default=None, help="learning rate (default: as --steps)")
    parser.add_argument("--rank", default=None, help="LoRA rank, or 'full' (default: as --steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request (default 0)")
    parser.add_argument("--keep", action="append", default=None, metavar="CONCEPTS",
                        help="concepts that must survive the request, comma-separated, in its --domain; repeatable. "
                        "Every method honours them (the closed form keeps them exactly, gradient projection retains "
                        "them, other trained methods add them to their retain loss)")
    group = parser.add_argument_group(
        "regularizers",
        "Without any of these flags a world's recipe brings its own (minicanvas: the closed-form solve keeping every "
        "other minicanvas concept; with training flags or --method esd, gradient projection keeping them), other "
        "models none. Any of them replaces the recipe's and makes the request a trained one.")
    group.add_argument("--retain", action="append", default=None, metavar="CONCEPTS",
                       help="gradient projection keeps these concepts, comma-separated; repeatable. It also keeps the "
                       "--neighbors nearest concepts of the vocabulary (default "
                       f"{gp_neighbors or 'as GradientProjection'}, or the recipe's number over the world's concepts): "
                       "pass --neighbors 0 to keep only these")
    group.add_argument("--neighbors", type=int, default=None,
                       help="gradient projection keeps this many concepts most similar to the target (default: see "
                       "--retain)")
    group.add_argument("--project", action="store_true",
                       help="gradient projection with its defaults (implied by --retain / --neighbors)")
    group.add_argument("--top-k", type=finite_float, default=None,
                       help="selective fine-tuning: fraction of K/V elements")
    group.add_argument("--l1", type=finite_float, default=None, help="L1 drift penalty weight")
    group.add_argument("--l2", type=finite_float, default=None, help="L2 drift penalty weight")
    group.add_argument("--regularizer", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                       help="a registered regularizer in the plan-file form, e.g. l2_drift:weight=1000 or "
                       "'gradient_projection:keep=[monet, picasso],neighbors=2'; repeatable; 'none' for no "
                       "regularizer at all")
    parser.add_argument("--strategy", default=None,
                        help="sequential (default), merge, ties, task_arithmetic or uniform (one per ledger)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the method's config, e.g. sampling_steps=20; repeatable")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model, for the model card")
    add_loading_options(parser)
    add_quiet(parser)
    parser.set_defaults(func=run)


def _yaml_value(text: str) -> Any:
    """A command-line value read as a plan file reads it: numbers, booleans, [lists], else text."""
    import yaml

    from ..plan_format import PlanLoader

    if not text:
        return ""
    try:
        return yaml.load(text, Loader=PlanLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def parse_options(items: list[str], flag: str = "--option") -> dict:
    """``KEY=VALUE`` pairs; values read as YAML scalars (numbers, booleans, lists), else as text."""
    from . import UsageError

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        options[key.strip()] = _yaml_value(value)
    return options


def _split_top_level(text: str) -> list[str]:
    """``a=1,b=[x, y]`` -> ``["a=1", "b=[x, y]"]``: commas inside brackets or braces belong to the value."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p.strip()]


def parse_regularizer(text: str) -> dict[str, Any]:
    """``NAME[:KEY=VALUE,...]`` -> ``{"name": NAME, KEY: VALUE, ...}`` (the plan file's form)."""
    from . import UsageError

    name, _, rest = text.partition(":")
    if not name.strip():
        raise UsageError(f"--regularizer takes NAME[:KEY=VALUE,...], got {text!r}")
    return {"name": name.strip(), **parse_options(_split_top_level(rest), flag=f"--regularizer {name.strip()}:")}


def build_regularizers(args: argparse.Namespace, recipe: Any = None) -> list | None:
    """The regularizers the flags ask for; None when no regularizer flag is given (the recipe's apply)."""
    from . import UsageError
    from ..regularizers import REGULARIZERS, check_regularizers, regularizer_from_dict

    specs: list[dict[str, Any]] = []
    retain = [c.strip() for value in (args.retain or []) for c in value.split(",") if c.strip()]
    if args.project or args.retain or args.neighbors is not None:
        specs.append({"name": "gradient_projection", "keep": retain,
                      **({} if args.neighbors is None else {"neighbors": args.neighbors})})
    for name, value, key in (("selective_finetune", args.top_k, "top_k"), ("l1_drift", args.l1, "weight"),
                             ("l2_drift", args.l2, "weight")):
        if value is not None:
            specs.append({"name": name, key: value})
    chose_none = "none" in args.regularizer
    specs += [parse_regularizer(text) for text in args.regularizer if text != "none"]
    if chose_none:
        if specs:
            raise UsageError("--regularizer none cannot be combined with other regularizer flags")
        return []
    if not specs:
        return None
    for spec in specs:
        if spec["name"] not in REGULARIZERS:
            raise UsageError(f"unknown regularizer {spec['name']!r}; registered: {', '.join(sorted(REGULARIZERS))}")
        if spec["name"] == "gradient_projection" and recipe is not None and recipe.vocabulary:
            # the world's concepts are the neighbour pool, as in its recipe
            spec.setdefault("vocabulary", recipe.vocabulary)
            spec.setdefault("neighbors", recipe.neighbors if recipe.neighbors is not None
                            else sum(len(c) for c in recipe.vocabulary.values()))
    return check_regularizers([regularizer_from_dict(spec) for spec in specs])


def _rank(value: str | None) -> int | str | None:
    from . import UsageError

    if value is None or value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"--rank must be an integer or 'full', got {value!r}") from None


def _world_of_folder(model: str) -> Any:
    """The world an unlearned folder was made on, told by its ledger's prompt domains (a recipe's requests use
    ``"<world>-style"`` / ``"<world>-object"``); None for any other model. Its next request then follows the same
    recipe, and the world's prompt domains are registered again for the earlier requests."""
    import json

    from ..worlds import get_world

    ledger = Path(model) / "unlearning" / "ledger.json"
    if not ledger.is_file():
        return None
    try:
        domains = [r.get("domain", "") for r in json.loads(ledger.read_text()).get("requests", [])]
    except (ValueError, AttributeError):
        return None  # loading the folder reports what is wrong with it
    names = {d.rpartition("-")[0] for d in domains if isinstance(d, str) and get_world(d.rpartition("-")[0])}
    world = get_world(names.pop()) if len(names) == 1 else None
    return world if world is not None and world.recipe else None


def request_inputs(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """``request.resolve_request`` keywords from the flags, and the world's recipe behind them (None without one).

    Everything but the model family and the earlier removals, which only the loaded model tells (``build_request``
    adds them). A world with a recipe (minicanvas) serves the recipe for the request's domain: its recommended one,
    or its trained one when training or regularizer flags are given without --method; every flag given overrides
    its part of it.

    Raises:
        UsageError: an unknown --method or regularizer, a malformed --option / --regularizer / --rank.
        ValueError: the world's recipe refuses the domain.
    """
    from . import UsageError
    from ..engine.defaults import TRAINED_METHOD, asks_for_training
    from ..objectives import OBJECTIVES
    from ..worlds import get_world

    if args.method is not None and args.method not in OBJECTIVES:
        raise UsageError(f"unknown --method {args.method!r}; registered methods: {', '.join(sorted(OBJECTIVES))}")
    options = parse_options(args.option)
    if args.anchor is not None:
        options["anchor"] = args.anchor
    world = get_world(args.model) or _world_of_folder(args.model)
    recipe = None
    if world is not None and world.recipe is not None:
        trained = asks_for_training(args.steps, args.learning_rate, args.rank, build_regularizers(args, None))
        recipe = world.request_recipe(args.domain, args.method or (TRAINED_METHOD if trained else None))
    # a recipe brings the method config for --method (or its own) and its prompt domain
    inputs: dict[str, Any] = {"method": None if recipe else args.method, "domain": None if recipe else args.domain,
                              "world_recipe": recipe, "seed": args.seed, **options}
    for key, value in (("steps", args.steps), ("learning_rate", args.learning_rate), ("rank", _rank(args.rank)),
                       ("strategy", args.strategy)):
        if value is not None:
            inputs[key] = value
    regularizers = build_regularizers(args, recipe)
    if regularizers is not None:
        inputs["regularizers"] = regularizers
    keep = [c.strip() for value in (args.keep or []) for c in value.split(",") if c.strip()]
    if keep:
        inputs["keep"] = keep
    return inputs, recipe


def build_request(args: argparse.Namespace, inputs: dict[str, Any], family: Any = None,
                  removed: Sequence[str] = ()) -> Any:
    """The request of the flags (``request_inputs``) on a model of ``family`` after the ``removed`` concepts: the
    command line's one call of ``request.resolve_request``. ``family`` None: the model is not loaded yet; ``run``
    checks the request so before loading the model, then builds it for the loaded model."""
    from ..engine.request import resolve_request

    concepts = requested_concepts(args)
    return resolve_request(concepts[0] if len(concepts) == 1 else concepts, family=family, removed=list(removed),
                           **inputs)


def requested_concepts(args: argparse.Namespace) -> list[str]:
    """The concepts of ``--concept`` (each value comma-separated, the flag repeatable), in order; a plain string
    (one concept, as a caller may set it) is taken as it is."""
    values = [args.concept] if isinstance(args.concept, str) else list(args.concept or [])
    if len(values) == 1 and isinstance(args.concept, str):
        return values
    return [c.strip() for value in values for c in value.split(",") if c.strip()]


def _recipe_escalation(recipe: Any, args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The recipe's escalation, unless an --option sets what it escalates: then the user's value stands."""
    from ..engine.defaults import escalation_unless_set

    return escalation_unless_set(recipe.escalate, parse_options(args.option))


def _describe(regularizer: Any) -> str:
    """``gradient_projection(keep=['monet'], neighbors=8)``: the settings that differ from the defaults, and always
    the neighbour count (what --retain brings with it)."""
    import dataclasses

    shown = {}
    for spec in dataclasses.fields(regularizer):
        value = getattr(regularizer, spec.name)
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if spec.name == "vocabulary" and value is not None:
            count = sum(len(c) for c in value.values()) if isinstance(value, dict) else len(value)
            shown[spec.name] = f"<{count} concepts>"
        elif value != default or spec.name == "neighbors":
            shown[spec.name] = repr(value)
    return f"{regularizer.name}({', '.join(f'{k}={v}' for k, v in shown.items())})"


def run(args: argparse.Namespace) -> int:
    from ..worlds import get_world

    # the checks that need no heavy import first, so that their errors come at once
    out = check_writable(args.out)
    world = get_world(args.model) or _world_of_folder(args.model)
    if world is not None:  # a concept outside the world's vocabulary (a misspelling) is refused before any work
        for concept in requested_concepts(args):
            world.check_concept(concept.strip(), args.domain)
    from ..publishing.export import check_output_folder
    from ..publishing.model_card import check_base_model

    check_base_model(args.base_model)
    inputs, recipe = request_inputs(args)
    request = build_request(args, inputs)  # checked whole before the model loads
    check_output_folder(out)
    if recipe:
        import textwrap

        print(textwrap.fill(f"{recipe.summary}; flags given override it", width=110, subsequent_indent="  "))
    if "regularizers" in inputs:
        print("regularizers: " + (", ".join(_describe(r) for r in request.regularizers) or "none"))
    pipe = load(args.model, args)
    from ..families.registry import family_of

    # for the loaded model: its family's default method, the recipe's retain pool less the earlier removals
    request = build_request(args, inputs, family_of(pipe), pipe.removed_concepts)
    before = len(pipe.unlearning_ledger.requests)
    checked = dict(erasure_check=recipe.erasure_check, escalate=_recipe_escalation(recipe, args)) if recipe else {}
    started = time.perf_counter()
    record = pipe.unlearn(request, progress=not args.quiet, **checked)
    waited = time.perf_counter() - started
    from ..engine.erasure_check import verdict

    work = "solving" if record.steps == 0 else f"{record.steps} training steps"
    shown = short(record.concept, 60 + 40 * (len(record.concepts) - 1))  # a request of several names them all
    print(f"removed {shown} as {record.request_id} in {waited:.1f} s ({work} {record.seconds:.1f} s, "
          f"the erasure check {max(waited - record.seconds, 0):.1f} s; final loss {record.final_loss:.4g}; "
          f"{before} earlier request(s))")
    if record.erasure:
        print(f"check: {'erased' if record.erasure.get('erased') else 'NOT erased'}, {verdict(record.erasure)}")
    with working(f"saving the unlearned pipeline to {out}", args.quiet):
        pipe.save_unlearned(out, base_model=args.base_model)
    print(f"saved the unlearned pipeline ({len(pipe.unlearning_ledger.requests)} request(s) folded) to {out}")
    return 0
