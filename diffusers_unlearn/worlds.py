"""Named worlds: the models that ``load_pipeline``, plan files and every subcommand know by name.

A world is a model plus, where one was calibrated for it, a *recipe*: the prompt templates, neighbour pool and
method settings its requests use by default. ``diffusers-unlearn unlearn minicanvas --concept "neon lines"
--domain style`` therefore serves the request the demo serves.

Loaders and recipes are registered as ``"package.module:function"`` references and imported when used, so listing
the names (``--help``, error messages) imports neither torch nor diffusers. One ``register_world(World(...))`` line
adds a world; a name is registered once.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .prompts import concepts_except, register_domain_provider

_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_PACKAGE_DIR = Path(__file__).resolve().parent


def _resolve(reference: str) -> Any:
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class WorldRecipe:
    """What a world's requests use unless the caller says otherwise.

    Args:
        unlearn_kwargs: ``pipe.unlearn`` keyword arguments (method config, prompt domain, training settings,
            regularizers, strategy); the caller adds the concept and may override any of them.
        vocabulary: gradient projection's neighbour pool, ``{prompt domain: concepts}`` (the world's auxiliary set).
        neighbors: how many of them gradient projection protects by default (None: all).
        summary: one line naming the settings, for the command line to print.
        preserve: the retain loss's pool for the trained method config in ``unlearn_kwargs``: a request keeps it
            less its own concept and the earlier removals, which only the caller knows (``preserve_for``). None: no
            retain loss.
        preserve_weight: the retain loss's weight.
        erasure_check: ``pipe.unlearn``'s argument of that name for the request (None: the library's shift
            check).
        escalate: ``pipe.unlearn``'s argument of that name (None: no escalation).
    """

    unlearn_kwargs: dict[str, Any]
    vocabulary: dict[str, list[str]] | None = None
    neighbors: int | None = None
    summary: str = ""
    preserve: list[str] | None = None
    preserve_weight: float = 0.0
    erasure_check: Any = None
    escalate: list[dict[str, Any]] | None = None

    def preserve_for(self, concept: str, removed: list[str]) -> list[str]:
        """The retain loss's concepts for a request removing ``concept`` after ``removed``."""
        return concepts_except(self.preserve or [], [concept, *removed])


@dataclass(frozen=True)
class World:
    """A model known by name to ``load_pipeline``, plan files and the command line; registered with ``register_world``.

    References are ``"package.module:function"`` strings, imported when used, so that listing the worlds imports
    neither torch nor diffusers.

    Args:
        name: what users type (``"minicanvas"``); one word, no ``/`` (so it is never a Hub id).
        description: one line for help texts and errors.
        pipeline: ``"module:function"`` returning the pipeline, called with ``pipeline_kwargs``.
        pipeline_kwargs: keyword arguments of the ``pipeline`` function (e.g. ``{"seed": 0}``).
        recipe: ``"module:function"`` called as ``f(domain, method)``, returning a :class:`WorldRecipe`; None: the
            library's defaults.
        folder: the world's pipeline folder inside the package, if it ships one (relative to the package).
        domains: ``"module:function"`` that registers the world's prompt domains (``"<name>-style"``, ...) with
            ``register_templates``; called the first time one of them is asked for, so that a ledger's requests
            (a rollback's re-solve, a loaded folder) find their templates in any process. None: the world has none.
        concepts: ``"module:function"`` returning the world's vocabulary, ``{kind: [concepts]}`` (``"style"``,
            ``"object"``): a request on the world that removes a concept outside it is refused before any work,
            with the nearest names (``check_concept``). None: any concept is accepted.
        evaluation: ``"module:function"`` returning the world's ``evaluation.EvalWorld`` (its axes, prompts and
            classifiers), what ``du.evaluation.attack`` uses on the world's pipelines. None: the world has none.

    Raises:
        ValueError: a name that is not one lower-case word, or a reference not shaped ``"package.module:function"``.

    Examples:
        >>> world = World("my-model", "my checkpoint", pipeline="my_package.models:load")
        >>> world.name, world.vocabulary()
        ('my-model', None)
    """

    name: str
    description: str
    pipeline: str
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    folder: str | None = None
    domains: str | None = None
    concepts: str | None = None
    evaluation: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            raise ValueError(f"world name must be one lower-case word (letters, digits, '.', '_', '-'), got "
                             f"{self.name!r}")
        for what in ("pipeline", "recipe", "domains", "concepts", "evaluation"):
            value = getattr(self, what)
            if (value is not None or what == "pipeline") and not (isinstance(value, str) and _REFERENCE.match(value)):
                raise ValueError(f"world {self.name!r}: {what} must be a 'package.module:function' reference, got "
                                 f"{value!r}")

    def load_pipeline(self) -> Any:
        """A fresh pipeline of this world (without ``UnlearnMixin``; ``load_pipeline`` attaches it), marked as the
        world's (``world_of``)."""
        pipe = _resolve(self.pipeline)(**dict(self.pipeline_kwargs))
        pipe.unlearn_world = self.name
        return pipe

    def vocabulary(self) -> dict[str, list[str]] | None:
        """The world's concepts per kind (``"style"``, ``"object"``), or None when it does not list them."""
        return None if self.concepts is None else {k: list(v) for k, v in _resolve(self.concepts)().items()}

    def check_concept(self, concept: str, kind: str | None = None) -> None:
        """Refuse a concept the world does not know, before any work: most often a misspelling.

        Case and spacing do not matter. A world that lists no concepts accepts every concept.

        Args:
            concept: the concept a request removes.
            kind: ``"style"`` or ``"object"`` to look only among those (None, or a kind the world does not list:
                among all).

        Raises:
            UnknownConceptError: the concept is not in the world's vocabulary; the message names the nearest ones,
                or the other kind it belongs to.
        """
        vocabulary = self.vocabulary()
        if vocabulary is None:
            return
        kinds = [kind] if kind in vocabulary else list(vocabulary)
        known = [c for k in kinds for c in vocabulary[k]]
        norm = " ".join(concept.lower().split())
        if norm in {" ".join(c.lower().split()) for c in known}:
            return
        other = [k for k in vocabulary if k not in kinds and norm in {" ".join(c.lower().split())
                                                                       for c in vocabulary[k]}]
        near = difflib.get_close_matches(norm, known, n=3, cutoff=0.6)
        hint = (f"it is a {self.name} {other[0]} (domain {other[0]!r}). " if other else
                f"did you mean {' or '.join(repr(c) for c in near)}? " if near else "")
        raise UnknownConceptError(f"{concept!r} is not a {self.name} {' or '.join(kinds)}: {hint}The {self.name} "
                                  f"{' and '.join(k + 's' for k in kinds)} are: {', '.join(known)}")

    def request_recipe(self, domain: str | None, method: str | None) -> WorldRecipe | None:
        """The world's calibrated settings for one request.

        Args:
            domain: the request's prompt domain (None: the recipe's default).
            method: the request's method (None: the world's own calibrated method).

        Returns:
            The recipe, or None when the world has none (the library's defaults apply).
        """
        return None if self.recipe is None else _resolve(self.recipe)(domain, method)

    def evaluation_world(self) -> Any:
        """The world's ``evaluation.EvalWorld``, or None when it declares none."""
        return None if self.evaluation is None else _resolve(self.evaluation)()

    def folder_path(self) -> Path | None:
        """The absolute path of the pipeline folder the world ships inside the package, or None."""
        return None if self.folder is None else _PACKAGE_DIR / self.folder


WORLDS: dict[str, World] = {}


def register_world(world: World) -> World:
    """Make ``world.name`` a model name everywhere: ``load_pipeline``, plan files' ``model:``, the command line.

    Args:
        world: the world to register.

    Returns:
        ``world`` itself.

    Raises:
        TypeError: not a ``World``.
        ValueError: the name is already registered (registries refuse duplicates).
    """
    if not isinstance(world, World):
        raise TypeError(f"register_world takes a World, got {world!r}")
    if world.name in WORLDS:
        raise ValueError(f"a world named {world.name!r} is already registered ({WORLDS[world.name].description}); "
                         "choose another name")
    WORLDS[world.name] = world
    return world


def get_world(name: object) -> World | None:
    """The world registered as ``name``, or None (a folder, a Hub id, anything else)."""
    return WORLDS.get(name) if isinstance(name, str) else None


def _world_domains(domain: str) -> None:
    """The domain provider of the named worlds: ``"<world>-<kind>"`` asks that world to register its domains."""
    world = get_world(domain.rpartition("-")[0])
    if world is not None and world.domains is not None:
        _resolve(world.domains)()


register_domain_provider(_world_domains)


class UnknownConceptError(ValueError):
    """A request names a concept that its world does not know (a misspelling, most often)."""


def world_of(pipe: Any, domain: str | None = None) -> tuple[World | None, str | None]:
    """The world a request on ``pipe`` in prompt ``domain`` belongs to, and the kind of concept it removes
    (``"style"``, ``"object"`` or None): the world named by a ``"<world>-<kind>"`` domain, else the one the pipeline
    was loaded as (``World.load_pipeline``), else the one its ledger's requests name. (None, None) for none."""
    if isinstance(domain, str):
        name, _, kind = domain.rpartition("-")
        world = get_world(name)
        if world is not None:
            return world, kind
    kind = domain if domain in ("style", "object") else None
    world = get_world(getattr(pipe, "unlearn_world", None))
    if world is not None:
        return world, kind
    state = getattr(pipe, "_unlearning_state", None)
    ledger = getattr(state, "ledger", None)
    names = {r.domain.rpartition("-")[0] for r in getattr(ledger, "requests", [])
             if isinstance(r.domain, str) and get_world(r.domain.rpartition("-")[0]) is not None}
    return (get_world(names.pop()), kind) if len(names) == 1 else (None, None)


def check_world_concept(pipe: Any, concept: str, domain: str | None, prompts_given: bool = False) -> None:
    """Refuse a request whose concept is not in the vocabulary of the world it runs on (``World.check_concept``);
    a request with its own prompts (e.g. a simultaneous retraining of several concepts) describes itself."""
    if prompts_given:
        return
    world, kind = world_of(pipe, domain)
    if world is not None:
        world.check_concept(concept, kind)


def world_names() -> list[str]:
    return list(WORLDS)


def describe_worlds() -> str:
    """One line per world, for help texts and errors; shipped folders included."""
    lines = []
    for world in WORLDS.values():
        where = world.folder_path()
        lines.append(f"{world.name}: {world.description}" + (f" (pipeline folder: {where})" if where else ""))
    return "; ".join(lines)


register_world(World(
    "minicanvas", "the shipped MiniCanvas model (synthetic styles x objects), with its calibrated request recipe",
    pipeline="diffusers_unlearn.minicanvas:load_pipeline",
    recipe="diffusers_unlearn.bench.world_recipe:minicanvas_recipe",
    folder="minicanvas/weights/pipeline",
    domains="diffusers_unlearn.bench.world:register_minicanvas_domains",
    concepts="diffusers_unlearn.minicanvas:concepts",
    evaluation="diffusers_unlearn.minicanvas.evaluation:eval_world",
))
register_world(World("tiny", "tiny random Stable Diffusion test pipeline built offline (seed 0)",
                     pipeline="diffusers_unlearn.families.tiny:tiny_pipeline", pipeline_kwargs={"seed": 0}))
register_world(World("tiny-sdxl", "tiny random SDXL test pipeline built offline (seed 0)",
                     pipeline="diffusers_unlearn.families.tiny:tiny_sdxl_pipeline", pipeline_kwargs={"seed": 0}))
register_world(World("tiny-sd3", "tiny random SD3 test pipeline built offline (seed 0)",
                     pipeline="diffusers_unlearn.families.tiny:tiny_sd3_pipeline", pipeline_kwargs={"seed": 0}))
register_world(World("tiny-flux", "tiny random Flux (guidance-distilled) test pipeline built offline (seed 0)",
                     pipeline="diffusers_unlearn.families.tiny:tiny_flux_pipeline", pipeline_kwargs={"seed": 0}))

__all__ = ["WORLDS", "UnknownConceptError", "World", "WorldRecipe", "check_world_concept", "describe_worlds",
           "get_world", "register_world", "world_names", "world_of"]
