"""The attack interface: settings, result, registry, and what every attack shares (prompts, scoring, copies).

An attack tries to make a pipeline produce a concept and reports how often the classifier then names it. Each kind
is one module with a config dataclass (its ``kind`` and options) and an ``Attack`` subclass, made available by one
``register_attack(Config, Attack)`` line, in the way peft registers a tuner. An attack never changes the pipeline
it is given: it works on copies (the text encoder and tokenizer, the whole pipeline) or, for ``rollback``, inside
``pipe.audit``, which restores the pipeline on exit.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from ..._validation import check_count, check_int, check_number, check_seed
from ...families.conditioning import Conditioner, Conditioning
from ...families.registry import family_of
from ...images import generate_images
from ...mixins.attach import UnlearnMixin
from ...prompts import TEMPLATES, check_concept, check_domain
from ..classifiers import Classifier, classify
from ..metrics import UNLEARNCANVAS_SEEDS
from ..world import EvalWorld, eval_world_of


def check_templates(owner: str, name: str, value: Any) -> tuple[str, ...]:
    """Templates with one ``{}`` slot (the concept) or ``{style}`` and ``{object}`` slots (a world's prompt)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{owner} option {name} must be a non-empty list of templates, got {value!r}")
    for template in value:
        slots = isinstance(template, str) and (
            template.count("{}") == 1 or ("{style}" in template and "{object}" in template and "{}" not in template))
        if not slots:
            raise ValueError(f"{owner} option {name}: each template needs one '{{}}' slot for the concept (or "
                             f"'{{style}}' and '{{object}}' slots), got {template!r}")
    return tuple(value)


@dataclass
class AttackConfig:
    """Settings every attack shares: which images are scored and how they are sampled.

    Args:
        seeds: generation seeds; every scored prompt gets one image per seed. An integer n: the first n of
            UnlearnCanvas's seeds (188, 288, 588, 688, 888).
        num_inference_steps: sampling steps of every scored image.
        guidance_scale: guidance scale of every scored image.
        batch_size: images per pipeline call.
        plain_templates: the concept's plain prompts (default: the world's prompt across its other axis for a
            concept of the attack's world, ``EvalWorld``; else the domain's templates, ``du.prompts.TEMPLATES``).
        progress: progress bars (default: follow the pipeline's ``set_progress_bar_config``).
    """

    kind: ClassVar[str] = ""
    seeds: Sequence[int] | int = 2
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    batch_size: int = 64
    plain_templates: Sequence[str] | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        owner = f"attack {self.kind!r}"
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            check_int(self.seeds, f"{owner} option seeds (an integer n: the first n of {list(UNLEARNCANVAS_SEEDS)}; "
                                  f"or a list of seeds)", minimum=1, maximum=len(UNLEARNCANVAS_SEEDS))
            self.seeds = list(UNLEARNCANVAS_SEEDS[: self.seeds])
        elif isinstance(self.seeds, str) or not isinstance(self.seeds, Sequence) or not self.seeds:
            raise ValueError(f"{owner} option seeds must be an integer n or a non-empty list of integers >= 0, "
                             f"got {self.seeds!r}")
        self.seeds = [check_seed(s, f"{owner} option seeds") for s in self.seeds]
        check_count(self.num_inference_steps, f"{owner} option num_inference_steps")
        check_count(self.batch_size, f"{owner} option batch_size")
        check_number(self.guidance_scale, f"{owner} option guidance_scale", minimum=0.0)
        if self.plain_templates is not None:
            self.plain_templates = check_templates(owner, "plain_templates", self.plain_templates)
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"{owner} option progress must be True, False or None, got {self.progress!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as an attack result records them (``progress`` left out: it changes no figure).

        Returns:
            A JSON-ready dict with the attack's ``kind``.
        """
        values = dataclasses.asdict(self)
        values.pop("progress")
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}


@dataclass
class TrainingAttackConfig(AttackConfig):
    """Settings every attack that optimises something (an embedding, a LoRA) shares; each kind sets its defaults.

    Args:
        steps: optimisation steps.
        learning_rate: the optimizer's learning rate.
        train_batch_size: training examples per step.
    """

    steps: int = 100
    learning_rate: float = 1e-4
    train_batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = f"attack {self.kind!r}"
        check_count(self.steps, f"{owner} option steps")
        check_count(self.train_batch_size, f"{owner} option train_batch_size")
        check_number(self.learning_rate, f"{owner} option learning_rate", minimum=0.0, exclusive_minimum=True)


@dataclass
class AttackResult:
    """What an attack found.

    Attributes:
        kind: the attack kind, e.g. "embedding".
        concept: the attacked concept.
        domain: its prompt domain.
        accuracy: percent of the attack's images that the classifier names as the concept.
        plain_accuracy: the same for the concept's plain prompts on the pipeline as given.
        seconds: the attack's wall time (its own images' scoring included, the plain prompts' excluded).
        steps: its optimisation steps (0 for prompt-only attacks).
        num_images: how many attack images were scored.
        settings: every option the attack ran with.
        details: per-kind figures (per wording, per try, per request).
    """

    kind: str
    concept: str
    domain: str
    accuracy: float
    plain_accuracy: float
    seconds: float
    steps: int
    num_images: int
    settings: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def robust_ua(self) -> float:
        """Unlearning accuracy under this attack: 100 - ``accuracy``."""
        return 100.0 - self.accuracy

    @property
    def plain_ua(self) -> float:
        """Unlearning accuracy on the plain prompts: 100 - ``plain_accuracy``."""
        return 100.0 - self.plain_accuracy

    def to_dict(self) -> dict[str, Any]:
        """Every field, with ``robust_ua`` and ``plain_ua`` added.

        Returns:
            A JSON-ready dict.
        """
        return {**dataclasses.asdict(self), "robust_ua": self.robust_ua, "plain_ua": self.plain_ua}

    def summary(self) -> str:
        """One line: the accuracy under attack and on the plain prompt, the UA change and the cost.

        Returns:
            The line.
        """
        return (f"{self.kind}: {self.concept!r} named in {self.accuracy:.1f}% of attack images (plain prompt "
                f"{self.plain_accuracy:.1f}%), UA {self.plain_ua:.1f} -> {self.robust_ua:.1f}; "
                f"{self.steps} steps, {self.seconds:.1f} s")


# ------------------------------------------------------------------------------------------------------ prompts
def fill_templates(templates: Sequence[str], concept: str, world: EvalWorld | None,
                   axis: str | None) -> list[list[str]]:
    """The prompts of each template: a ``{}`` template gives one prompt; a ``{style}``/``{object}`` template gives
    one per concept of the world's other axis (``axis``: the concept's own, ``world.axis``)."""
    out = []
    for template in templates:
        if "{}" in template:
            out.append([template.format(concept)])
            continue
        if world is None or axis is None:
            raise ValueError(f"template {template!r} has {{style}}/{{object}} slots, which only a concept of the "
                             f"attack's world fills (world={None if world is None else world.name!r}); "
                             f"{concept!r} is not one: use templates with one '{{}}' slot, or pass world=")
        out.append(world.fill(template, concept, axis))
    return out


def default_plain_templates(concept: str, domain: str, world: EvalWorld | None) -> tuple[str, ...]:
    """The world's own prompt for its concepts, else the domain's request templates."""
    if world is not None and world.axis(concept, domain) is not None:
        return (world.template,)
    return TEMPLATES[check_domain(domain)]


# ------------------------------------------------------------------------------------------------------ context
@dataclass
class AttackContext:
    """What an attack works with: the pipeline (never to be changed), the concept, the judge, the settings and the
    world the concept belongs to (None: a concept prompted with the domain's generic templates).

    Attributes:
        pipe: the pipeline under attack (never changed).
        concept: the attacked concept.
        domain: its prompt domain.
        classifier: the judge, from images to labels.
        seed: the attack's seed.
        config: the attack's settings.
        world: the evaluation world of the concept, or None.
        _plain: the plain prompts' accuracy once computed (internal cache).
        _plain_images: the plain prompts' images once generated (internal cache).
    """

    pipe: Any
    concept: str
    domain: str
    classifier: Classifier
    seed: int
    config: AttackConfig
    world: EvalWorld | None = None
    _plain: float | None = None
    _plain_images: torch.Tensor | None = None

    @property
    def axis(self) -> str | None:
        """The concept's axis in its world ("style" or "object"), or None outside a world."""
        return None if self.world is None else self.world.axis(self.concept, self.domain)

    @property
    def progress(self) -> bool:
        """Whether to show progress bars: the config's choice, else the pipeline's progress bar config."""
        if self.config.progress is not None:
            return self.config.progress
        return not (getattr(self.pipe, "_progress_bar_config", None) or {}).get("disable", False)

    def plain_templates(self) -> tuple[str, ...]:
        """The concept's plain templates: the config's, else the world's prompt or the domain's templates.

        Returns:
            The templates.
        """
        return tuple(self.config.plain_templates or default_plain_templates(self.concept, self.domain, self.world))

    def prompts(self, templates: Sequence[str], concept: str | None = None) -> list[str]:
        """Every prompt of ``templates`` filled with ``concept`` (default: the attacked concept's own words).

        Args:
            templates: templates with one ``{}`` slot or ``{style}``/``{object}`` slots.
            concept: the words to fill in (default: the attacked concept).

        Returns:
            The prompts, template by template.

        Raises:
            ValueError: a ``{style}``/``{object}`` template for a concept outside the attack's world.
        """
        return [p for group in fill_templates(templates, concept or self.concept, self.world, self.axis)
                for p in group]

    def plain_prompts(self) -> list[str]:
        """The concept's plain prompts (``plain_templates`` filled with it).

        Returns:
            The prompts.
        """
        return self.prompts(self.plain_templates())

    def images(self, pipe: Any, prompts: Sequence[str], desc: str) -> torch.Tensor:
        """One image per prompt and seed, prompt-major.

        Args:
            pipe: the pipeline to sample (a view of it is used, so its scheduler is untouched).
            prompts: the prompts.
            desc: the progress bar's label.

        Returns:
            The images as a tensor.
        """
        cases = [(p, s) for p in prompts for s in self.config.seeds]
        return generate_images(pipeline_view(pipe), [p for p, _ in cases], [s for _, s in cases],
                               num_inference_steps=self.config.num_inference_steps,
                               guidance_scale=self.config.guidance_scale, batch_size=self.config.batch_size,
                               progress=self.progress, desc=desc)

    def hits(self, images: torch.Tensor) -> list[bool]:
        """Whether the classifier names each image as the concept.

        Args:
            images: the images to judge.

        Returns:
            One bool per image.
        """
        return [label == self.concept for label in classify(self.classifier, images)]

    def accuracy(self, pipe: Any, prompts: Sequence[str], desc: str = "attack images") -> float:
        """Percent of the images of ``prompts`` (one per seed) on ``pipe`` that the classifier names as the concept.

        Args:
            pipe: the pipeline to sample.
            prompts: the prompts.
            desc: the progress bar's label.

        Returns:
            The accuracy in percent.
        """
        hits = self.hits(self.images(pipe, prompts, desc))
        return 100.0 * sum(hits) / len(hits)

    def plain_accuracy(self) -> float:
        """The plain prompts on the pipeline as given (computed once)."""
        if self._plain is None:
            self._plain_images = self.images(self.pipe, self.plain_prompts(), "plain prompts")
            hits = self.hits(self._plain_images)
            self._plain = 100.0 * sum(hits) / len(hits)
        return self._plain

    def plain_images(self) -> torch.Tensor:
        """The plain prompts' images on the pipeline as given (``images`` order; computed once)."""
        self.plain_accuracy()
        return self._plain_images

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the attack's seed, so each use of randomness is reproducible.

        Args:
            offset: tells apart the generators of one attack's different uses.

        Returns:
            A new generator.
        """
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)


@dataclass
class AttackOutcome:
    """What an attack's ``run`` returns; ``attack()`` adds the plain accuracy, the settings and the time.

    Attributes:
        accuracy: percent of the attack's images that the classifier names as the concept.
        steps: optimisation steps (0 for prompt-only attacks).
        num_images: how many attack images were scored.
        details: per-kind figures.
    """

    accuracy: float
    steps: int
    num_images: int
    details: dict[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """One kind of recovery attack. Subclasses are registered with ``register_attack``.

    Args:
        config: the attack's settings (an instance of ``config_class``).
        context: the pipeline, concept, classifier and world it attacks.
    """

    config_class: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig, context: AttackContext):
        self.config = config
        self.context = context

    def check(self) -> None:
        """Refuse a pipeline or concept this attack cannot run on, before any work (default: accept all)."""

    @abstractmethod
    def run(self) -> AttackOutcome:
        """Attack ``context.pipe`` (without changing it) and score the attack's images.

        Returns:
            The accuracy under attack, its optimisation steps, the number of images scored and per-kind details.
        """


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(config_class: type[AttackConfig], attack_class: type[Attack]) -> None:
    """Make ``config_class.kind`` usable as ``du.evaluation.attack(..., kind)``; a kind is registered once.

    Args:
        config_class: the kind's settings dataclass; its ``kind`` names the attack.
        attack_class: the ``Attack`` subclass that runs it.

    Raises:
        ValueError: ``config_class.kind`` is empty, or the kind is already registered.
    """
    kind = config_class.kind
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{config_class.__name__}.kind must name the attack kind")
    if kind in ATTACKS:
        raise ValueError(f"attack kind {kind!r} is already registered (by {ATTACKS[kind].__name__}); "
                         f"registered kinds: {sorted(ATTACKS)}")
    attack_class.config_class = config_class
    ATTACKS[kind] = attack_class


def build_attack_config(kind: str, options: dict[str, Any]) -> AttackConfig:
    """The settings of a registered attack kind from keyword options.

    Args:
        kind: a registered attack kind, e.g. "paraphrase".
        options: the kind's options and the shared ones of ``AttackConfig``.

    Returns:
        The kind's config, validated.

    Raises:
        ValueError: an unknown kind or a bad value.
        TypeError: an option the kind does not have.
    """
    if not isinstance(kind, str) or kind not in ATTACKS:
        raise ValueError(f"unknown attack kind {kind!r}; allowed kinds: {sorted(ATTACKS)}")
    config_class = ATTACKS[kind].config_class
    allowed = {f.name for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"attack {kind!r} has no option(s) {unknown}; allowed: {sorted(allowed)}")
    return config_class(**options)


def attack(
    pipe: Any,
    concept: str,
    kind: str,
    *,
    domain: str | None = None,
    classifier: Classifier,
    seed: int = 0,
    world: EvalWorld | None = None,
    **options: Any,
) -> AttackResult:
    """Try to bring ``concept`` back on ``pipe`` with one kind of attack; the pipeline is left unchanged.

    Args:
        pipe: a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux pipeline, unlearned (``du.attach``) or not.
        concept: the concept to recover, a label the classifier answers with.
        kind: "paraphrase", "embedding", "finetune", "rollback" or any registered kind (``ATTACKS``).
        domain: prompt domain of the concept ("style", "object", "concept" (default), registered, or a world's
            ``"<world>-style"`` / ``"<world>-object"``). A style or object of the world is prompted with the world's
            own prompt across its other axis.
        classifier: ``images -> labels``; accuracy is the percent of images it names as ``concept``.
        seed: makes the attack reproducible (optimisation noise, timesteps, minibatches, adapter init).
        world: the world the concept belongs to (its axes, prompts, held-out wordings and training images;
            ``EvalWorld``). None: the world of the pipeline or domain (``eval_world_of``: e.g. MiniCanvas for a
            pipeline loaded with ``du.minicanvas.load_pipeline``), if any.
        **options: the kind's settings (see its config class, e.g. ``EmbeddingAttackConfig``) and the shared ones
            of ``AttackConfig`` (``seeds``, ``num_inference_steps``, ``guidance_scale``, ...).

    Returns:
        The ``AttackResult``: accuracy under attack and on the plain prompts, cost, settings and per-kind details.

    Raises:
        ValueError: an unknown kind, a bad option, concept, domain or seed, or a concept the classifier never
            answers with.
        TypeError: an option the kind does not have, a classifier that is not callable, a world that is not an
            ``EvalWorld``, or a pipeline the kind cannot attack.
    """
    config = build_attack_config(kind, options)
    concept = check_concept(concept)
    domain = "concept" if domain is None else domain
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain must be a non-empty string, got {domain!r}")
    if world is None:
        world = eval_world_of(pipe, domain)
    elif not isinstance(world, EvalWorld):
        raise TypeError(f"world must be an evaluation.EvalWorld or None, got {world!r}")
    if world is None or world.axis(concept, domain) is None:
        check_domain(domain)
    check_seed(seed)
    if not callable(classifier):
        raise TypeError(f"classifier must be a callable from images to labels, got {classifier!r}")
    labels = getattr(classifier, "labels", None)
    if labels is not None and concept not in list(labels):
        raise ValueError(f"the classifier never answers {concept!r}, so no attack could find it; its labels: "
                         f"{list(labels)[:20]}")
    family_of(pipe)  # a TypeError naming the supported families for any other pipeline
    context = AttackContext(pipe, concept, domain, classifier, seed, config, world)
    runner = ATTACKS[kind](config, context)
    runner.check()
    plain = context.plain_accuracy()
    started = time.perf_counter()  # the attack's cost: everything after scoring the plain prompts
    outcome = runner.run()
    return AttackResult(
        kind=kind,
        concept=concept,
        domain=domain,
        accuracy=float(outcome.accuracy),
        plain_accuracy=float(plain),
        seconds=round(time.perf_counter() - started, 3),
        steps=int(outcome.steps),
        num_images=int(outcome.num_images),
        settings={**config.to_dict(), "seed": seed, "world": None if world is None else world.name,
                  "plain_prompts": context.plain_prompts()},
        details=outcome.details,
    )


# ----------------------------------------------------------------------------------------------------- helpers
def base_pipeline(pipe: Any) -> Any:
    """The model before any unlearning request: ``pipe`` itself when it holds none, else a copy with every request
    rolled back (the user's pipeline is untouched)."""
    if not isinstance(pipe, UnlearnMixin) or not pipe.unlearning_ledger.requests:
        return pipe
    base = copy.deepcopy(pipe)
    base.unfold()  # rolling back a folded pipeline would warn about re-folding at every request
    for request_id in list(base.unlearning_ledger.ids()):
        base.rollback(request_id)
    return base


@torch.no_grad()
def generate_latents(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int,
                     guidance_scale: float, batch_size: int = 64) -> torch.Tensor:
    """Final latents (the denoiser's space, before the VAE: Flux's packed tokens) of one sample per
    ``(prompts[i], seeds[i])``, on the CPU; each sample seeded on its own as in ``generate_images``."""
    view = pipeline_view(pipe)
    view.set_progress_bar_config(disable=True)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out = view(list(prompts[start : start + batch_size]), generator=generators, output_type="latent",
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        chunks.append(out.images.detach().float().cpu())
    return torch.cat(chunks)


class NoisedBatches:
    """Minibatches for ordinary denoising training on clean latents: rows, timesteps and noise drawn from one
    generator, the noised latents and the target the pipeline's model predicts.

    UNets (DDPM noising): epsilon or v, as the scheduler's ``prediction_type`` says. Flow-matching transformers (SD3,
    Flux): ``x_t = (1 - sigma) x0 + sigma noise`` and the velocity ``noise - x0``, with sigma and its timestep
    drawn uniformly from the scheduler's training schedule, as diffusers' SD3 and Flux training scripts do.
    """

    def __init__(self, pipe: Any, latents: torch.Tensor, generator: torch.Generator):
        self.flow = family_of(pipe).parametrisation == "flow"
        if self.flow:
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            self.prediction_type = "flow"
        else:
            self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            self.prediction_type = self.scheduler.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"denoising training supports epsilon and v_prediction schedulers, got "
                                 f"{self.prediction_type!r}")
        self.latents = latents
        self.generator = generator

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, noisy latents, timesteps, target)``, on the CPU in float32; ``timesteps`` in the scheduler's
        units (what the pipeline's sampler hands the model)."""
        gen = self.generator
        rows = torch.randint(0, len(self.latents), (batch_size,), generator=gen)
        index = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        clean = self.latents[rows]
        noise = torch.randn(clean.shape, generator=gen)
        if self.flow:
            sigma = self.scheduler.sigmas[index].float().view(-1, *[1] * (clean.ndim - 1))
            return rows, (1.0 - sigma) * clean + sigma * noise, self.scheduler.timesteps[index].float(), noise - clean
        noisy = self.scheduler.add_noise(clean, noise, index)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(clean, noise, index)
        return rows, noisy, index, target


def differentiable_encode(conditioner: Conditioner, prompts: list[str]) -> Conditioning:
    """``conditioner.encode(prompts)`` (the pipeline's own ``encode_prompt``) with gradients: the conditioner's
    encoding is wrapped in ``torch.no_grad``, which an attack that learns a token embedding must go around."""
    return inspect.unwrap(type(conditioner).encode)(conditioner, prompts)


def diffusers_class(pipe: Any) -> type:
    """The plain diffusers class of a pipeline (``du.attach`` makes a subclass that adds ``UnlearnMixin``)."""
    for cls in type(pipe).__mro__:
        if issubclass(cls, DiffusionPipeline) and not issubclass(cls, UnlearnMixin):
            return cls
    raise TypeError(f"{type(pipe).__name__} is not a diffusers pipeline")


# Pipeline-object settings a view keeps: the default image size (FluxPipeline hard-codes 1024 px), the text length
# unlearning reads, the world the pipeline was loaded as.
VIEW_ATTRIBUTES = ("default_sample_size", "unlearning_max_sequence_length", "unlearn_world")


def pipeline_view(pipe: Any, **replace: Any) -> Any:
    """A new pipeline object over the same components, with some replaced (e.g. a copied text encoder) and its own
    scheduler, so that sampling with it changes nothing of ``pipe``."""
    components = dict(pipe.components)
    components["scheduler"] = type(pipe.scheduler).from_config(pipe.scheduler.config)
    components.update(replace)
    cls = diffusers_class(pipe)
    accepted = inspect.signature(cls.__init__).parameters
    if "requires_safety_checker" in accepted:
        components["requires_safety_checker"] = bool(getattr(pipe.config, "requires_safety_checker", False))
    view = cls(**{k: v for k, v in components.items() if k in accepted})
    for name in VIEW_ATTRIBUTES:  # what a deployment (or the tiny Flux pipeline) sets on the pipeline object
        if name in vars(pipe):
            setattr(view, name, getattr(pipe, name))
    view.set_progress_bar_config(**(getattr(pipe, "_progress_bar_config", None) or {}))
    return view
