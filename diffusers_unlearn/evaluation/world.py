"""What evaluation and attacks need to know of a world: its concepts on two axes, its prompts, its classifiers.

Evaluation knows no model of its own. A world (MiniCanvas, a Stable Diffusion checkpoint with CLIP zero-shot
classifiers, a test world) hands it an :class:`EvalWorld`: the styles and objects, the prompt template with
``{style}`` and ``{object}`` slots, wordings no request uses, the recommended sampling, the classifiers, and, when
it has real images of its concepts, how to render them (the fine-tune attack trains on those).

A world plugs in from its own side: ``du.minicanvas.eval_world()`` builds MiniCanvas's, ``BenchWorld.eval_world``
any bench world's, and a named world (``du.World(..., evaluation="module:function")``) lets ``attack`` find the
world of a pipeline loaded as that world (``eval_world_of``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .._validation import check_count, check_number, check_seed
from ..worlds import get_world, world_names, world_of
from .classifiers import Classifier
from .metrics import UNLEARNCANVAS_SEEDS, EvalConfig

AXES: tuple[str, ...] = ("style", "object")
# (style, object, seed, size) -> one size x size RGB image of that object in that style
Renderer = Callable[[str, str, int, int], Image.Image]


def _names(values: Any, what: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values \
            or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"EvalWorld {what} must be a non-empty list of names, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"EvalWorld {what} has duplicates: {list(values)}")
    return tuple(values)


def _two_slot_templates(values: Any, what: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"EvalWorld {what} must be a list of templates, got {values!r}")
    for template in values:
        if not isinstance(template, str) or "{style}" not in template or "{object}" not in template:
            raise ValueError(f"EvalWorld {what}: each template needs '{{style}}' and '{{object}}' slots, got "
                             f"{template!r}")
    return tuple(values)


@dataclass(frozen=True)
class EvalWorld:
    """A style x object world as evaluation and attacks see it.

    Args:
        name: the world's name; its prompt domains are ``"<name>-style"`` and ``"<name>-object"``.
        styles: every style of the world (not only the evaluated ones): an attack on one of them prompts it with
            the world's own template across the objects.
        objects: every object of the world.
        template: the world's prompt, with ``{style}`` and ``{object}`` slots.
        heldout_templates: wordings of the same prompt that no request uses (``{style}`` and ``{object}`` slots):
            the paraphrase attack's default. Empty: the domain's generic held-out wordings.
        seeds: the evaluation's generation seeds (``eval_config``'s default).
        num_inference_steps: the world's recommended sampling steps.
        guidance_scale: the world's recommended guidance scale.
        classifiers: ``classifiers(**kwargs) -> (style_classifier, object_classifier)``, e.g. a loader that takes
            ``device`` and a weights folder; None: the caller brings its own classifiers.
        render: ``render(style, object, seed, size) -> PIL image``, the world's real images of a pair (the
            fine-tune attack trains on them, as a user fine-tunes on real data); None: the fine-tune attack trains
            on the pipeline's own samples.

    Raises:
        ValueError: a list that is empty, not of names, or has duplicates; a template without both slots; a bad
            seed or sampling setting.
    """

    name: str
    styles: Sequence[str]
    objects: Sequence[str]
    template: str
    heldout_templates: Sequence[str] = ()
    seeds: Sequence[int] = UNLEARNCANVAS_SEEDS
    num_inference_steps: int = 100
    guidance_scale: float = 9.0
    classifiers: Callable[..., tuple[Classifier, Classifier]] | None = field(default=None, compare=False)
    render: Renderer | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or " " in self.name:
            raise ValueError(f"EvalWorld name must be a non-empty word, got {self.name!r}")
        object.__setattr__(self, "styles", _names(self.styles, "styles"))
        object.__setattr__(self, "objects", _names(self.objects, "objects"))
        (template,) = _two_slot_templates([self.template], "template")
        object.__setattr__(self, "heldout_templates", _two_slot_templates(self.heldout_templates,
                                                                          "heldout_templates"))
        if isinstance(self.seeds, (str, int)) or not isinstance(self.seeds, Sequence) or not self.seeds:
            raise ValueError(f"EvalWorld seeds must be a non-empty list of integers >= 0, got {self.seeds!r}")
        object.__setattr__(self, "seeds", tuple(check_seed(s, "EvalWorld seeds") for s in self.seeds))
        check_count(self.num_inference_steps, "EvalWorld num_inference_steps")
        check_number(self.guidance_scale, "EvalWorld guidance_scale", minimum=0)
        for what in ("classifiers", "render"):
            value = getattr(self, what)
            if value is not None and not callable(value):
                raise TypeError(f"EvalWorld {what} must be callable or None, got {value!r}")

    def concepts(self, axis: str) -> tuple[str, ...]:
        """Every concept of ``axis`` ("style" or "object").

        Args:
            axis: "style" or "object".

        Returns:
            The world's concepts of that axis, in order.

        Raises:
            ValueError: ``axis`` is neither.
        """
        return self.styles if check_axis(axis) == "style" else self.objects

    def axis(self, concept: str, domain: str) -> str | None:
        """"style" or "object" when ``concept`` is one of the world's concepts of the axis ``domain`` names
        ("style", "object", or a prompt domain ``"<world>-style"`` / ``"<world>-object"``), else None.

        Args:
            concept: the concept to look up.
            domain: "style", "object", or a prompt domain ending in one of them.

        Returns:
            The axis, or None when the concept is not one of the world's concepts of it.
        """
        axis = domain.rsplit("-", 1)[-1]
        return axis if axis in AXES and concept in self.concepts(axis) else None

    def prompt(self, style: str, obj: str, template: str | None = None) -> str:
        """``template`` (default: the world's) filled with one style and one object.

        Args:
            style: the style filled into ``{style}``.
            obj: the object filled into ``{object}``.
            template: a ``{style}``/``{object}`` template (default: the world's).

        Returns:
            The prompt.
        """
        return (template or self.template).format(style=style, object=obj)

    def fill(self, template: str, concept: str, axis: str) -> list[str]:
        """A ``{style}``/``{object}`` template with ``concept`` in the ``axis`` slot, across every concept of the
        other axis (one prompt each).

        Args:
            template: a template with ``{style}`` and ``{object}`` slots.
            concept: the concept put in the ``axis`` slot.
            axis: "style" or "object".

        Returns:
            One prompt per concept of the other axis, in the world's order.

        Raises:
            ValueError: ``axis`` is neither "style" nor "object".
        """
        if check_axis(axis) == "style":
            return [self.prompt(concept, o, template) for o in self.objects]
        return [self.prompt(s, concept, template) for s in self.styles]

    def eval_config(self, seeds: Sequence[int] | int | None = None, **overrides: Any) -> EvalConfig:
        """Every style x object prompt of the world at its seeds, sampled as it recommends.

        Args:
            seeds: the seeds, or an integer n for the first n of the world's (default: all of them).
            **overrides: any other ``EvalConfig`` field (e.g. a subset of ``styles``, ``batch_size``).

        Returns:
            The ``EvalConfig``.

        Raises:
            ValueError: n outside 1..len(seeds), or an ``EvalConfig`` field it refuses.
        """
        if seeds is None:
            seeds = list(self.seeds)
        elif isinstance(seeds, int) and not isinstance(seeds, bool):
            if not 1 <= seeds <= len(self.seeds):
                raise ValueError(f"{self.name} has {len(self.seeds)} evaluation seeds; asked for {seeds}")
            seeds = list(self.seeds)[:seeds]
        values: dict[str, Any] = dict(styles=list(self.styles), objects=list(self.objects), template=self.template,
                                      seeds=seeds, num_inference_steps=self.num_inference_steps,
                                      guidance_scale=self.guidance_scale)
        values.update(overrides)
        return EvalConfig(**values)

    def load_classifiers(self, **kwargs: Any) -> tuple[Classifier, Classifier]:
        """``(style_classifier, object_classifier)`` of the world; ``kwargs`` go to its loader.

        Args:
            **kwargs: passed to the world's classifier loader (e.g. a device).

        Returns:
            The style and the object classifier.

        Raises:
            ValueError: the world has no classifiers of its own.
        """
        if self.classifiers is None:
            raise ValueError(f"world {self.name!r} has no classifiers of its own: pass style and object classifiers")
        return self.classifiers(**kwargs)


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {list(AXES)}, got {axis!r}")
    return axis


def eval_world_of(pipe: Any, domain: str | None = None) -> EvalWorld | None:
    """The evaluation world of a pipeline: that of the named world a request on ``pipe`` in ``domain`` belongs to
    (``du.worlds.world_of``: a ``"<world>-<kind>"`` domain, the world the pipeline was loaded as, or its ledger's),
    when that world declares one; else None.

    Args:
        pipe: the pipeline.
        domain: a request's domain (None: the pipeline's own world or its ledger's).

    Returns:
        The evaluation world, or None.
    """
    world, _ = world_of(pipe, domain)
    return None if world is None else world.evaluation_world()


def named_eval_world(name: str) -> EvalWorld:
    """The evaluation world of the registered world ``name``.

    Args:
        name: a registered world's name.

    Returns:
        Its evaluation world.

    Raises:
        ValueError: no world of that name, or one without an evaluation world.
    """
    world = get_world(name)
    found = None if world is None else world.evaluation_world()
    if found is None:
        raise ValueError(f"no registered world {name!r} with an evaluation world; worlds: {world_names()}")
    return found
