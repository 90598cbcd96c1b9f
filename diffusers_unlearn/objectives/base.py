"""The method interface, in two kinds chosen by class through one registry (``register_objective``).

- A trained method (``TrainedObjective``) says what the adapted model should predict instead, for one concept. It
  knows nothing of regularizers or adapters: the trainer hands it an ``ObjectiveContext`` (the UNet, how to run it
  frozen, the prompts) and asks for losses. Those in this package (``TrajectoryObjective``) sample trajectories from
  the frozen model once per request and reuse them (and the frozen predictions on them) across training steps.
- A solved method (``SolvedObjective``) computes the request's change directly, with no training loop: the trainer
  hands it a ``SolveContext`` (the base weights, the start model, the earlier requests) and takes the artifact it
  returns. Where a solve depends on the requests before it, its ``after_rollback`` hook re-solves it when one of
  them is rolled back; the engine calls it in ledger order.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._deprecation import RenamedOptions, rename_options
from .._validation import check_count, check_int, check_number
from ..kv.adapters import RequestAdapter
from ..families.conditioning import Conditioner, Conditioning, sample_trajectory
from ..prompts import check_concept, same_concept


@dataclass
class ObjectiveConfig(RenamedOptions):
    """Settings every trajectory-based objective shares.

    Args:
        sampling_steps: sampler steps of the frozen model's trajectories (x_t is drawn from them): DDIM for the
            UNets, the pipeline's own flow-matching scheduler for SD3 and Flux.
        guidance_scale: classifier-free guidance used to sample those trajectories (ESD's "start guidance"); for
            guidance-distilled Flux, the guidance embedding of every prediction (it has no CFG).
        num_trajectories: trajectories sampled once per request and reused by every training step.
        resolution: image size in pixels for the trajectories (default: the UNet's native size).
    """

    method: ClassVar[str] = ""
    sampling_steps: int = 50
    guidance_scale: float = 3.0
    num_trajectories: int = 4
    resolution: int | None = None

    def __post_init__(self) -> None:
        check_count(self.sampling_steps, "sampling_steps")
        check_count(self.num_trajectories, "num_trajectories")
        if self.resolution is not None:
            check_int(self.resolution, "resolution", minimum=8)
        check_number(self.guidance_scale, "guidance_scale", minimum=0)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the ledger records them, with the method's name under ``"method"``.

        Returns:
            A JSON-ready dict that ``build_objective_config`` turns back into an equal config.
        """
        data = {"method": self.method, **dataclasses.asdict(self)}
        if "concepts" in data:  # a several-concept field: one-concept requests keep the record they always had
            if data["concepts"] is None:
                del data["concepts"]
            else:
                data["concepts"] = list(data["concepts"])
        return data

    def check_regularizers(self, regularizers: Sequence[Any]) -> None:
        """Refuse regularizers this method cannot apply (called before anything runs).

        Trained methods take all; a solved method takes none (it trains nothing for them to act on).

        Args:
            regularizers: the request's regularizer objects.

        Raises:
            ValueError: regularizers given to a solved method.
        """
        registered = OBJECTIVES.get(self.method)
        if regularizers and registered is not None and issubclass(registered[1], SolvedObjective):
            names = [getattr(r, "name", type(r).__name__) for r in regularizers]
            raise ValueError(f"method {self.method!r} is solved, not trained: it takes no regularizers (got {names})")


@dataclass
class TrainedObjectiveConfig(ObjectiveConfig):
    """Settings of the methods trained on the frozen model's trajectories (``TrajectoryObjective``).

    Args:
        keep: concepts to keep: at each training step one of them, in the slot of the removed concept of the same
            prompt, is trained toward the frozen model's prediction on the same x_t (a retain loss). Where concepts
            share most of their text embedding (neighbouring objects), an edit that erases one moves the others;
            this holds them. Empty (default): no retain loss, one forward pass per step. Formerly ``preserve``.
        keep_weight: weight of the retain loss against the erasure loss (both mean squared errors). Formerly
            ``preserve_weight``.
        sampling_steps: as in ``ObjectiveConfig``.
        guidance_scale: as in ``ObjectiveConfig``.
        num_trajectories: as in ``ObjectiveConfig``.
        resolution: as in ``ObjectiveConfig``.
    """

    renamed_options: ClassVar[Mapping[str, str]] = {"preserve": "keep", "preserve_weight": "keep_weight"}
    keep: Sequence[str] = ()
    keep_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.keep, str):
            raise ValueError(f"keep must be a list of concepts, got the string {self.keep!r}")
        self.keep = tuple(check_concept(c, "each of keep") for c in self.keep)
        if len({c.lower() for c in self.keep}) != len(self.keep):
            raise ValueError(f"keep lists a concept twice: {list(self.keep)}")
        check_number(self.keep_weight, "keep_weight", minimum=0)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the ledger records them; ``keep`` and ``keep_weight`` only when something is kept.

        Returns:
            A JSON-ready dict, the same as before the retain loss existed for requests that keep nothing.
        """
        data = super().to_dict()
        if self.keep:
            data["keep"] = list(self.keep)
        else:  # requests without a retain loss keep the record they always had
            del data["keep"], data["keep_weight"]
        return data


@dataclass
class ObjectiveContext:
    """What the trainer gives an objective for one request.

    Attributes:
        pipe: the pipeline being edited.
        conditioner: encodes prompts and runs the denoiser for this model family.
        denoiser: the UNet, or SD3's / Flux's transformer.
        concept: the concept being removed (for a request of several, their label).
        prompts: the request's prompts naming the concept.
        frozen: a context manager factory that runs the denoiser without the request's adapter.
        generator: CPU generator seeded from the request's seed (every random draw goes through it).
        templates: the templates behind ``prompts`` (None: prompts given directly).
        progress: show a progress bar while sampling the frozen model's trajectories.
        concepts: every concept the request removes (empty: ``(concept,)``); several share one run, each prompt
            naming one of them.
    """

    pipe: Any
    conditioner: Conditioner
    denoiser: torch.nn.Module  # the denoiser: the UNet, or SD3's / Flux's transformer
    concept: str
    prompts: list[str]
    frozen: Callable[[], AbstractContextManager]  # runs the UNet without the request's adapter
    generator: torch.Generator  # CPU generator seeded from the request's seed
    templates: tuple[str, ...] | None = None  # the templates behind ``prompts`` (None: prompts given directly)
    progress: bool = False  # show a progress bar while sampling the frozen model's trajectories
    concepts: tuple[str, ...] = ()  # every concept removed (empty: just ``concept``)

    @property
    def removed(self) -> tuple[str, ...]:
        """Every concept the request removes: ``concepts``, or ``(concept,)``."""
        return tuple(self.concepts) or (self.concept,)


def swap_concept(prompt: str, concept: str, replacement: str) -> str:
    """``prompt`` with its first occurrence of ``concept`` (case-insensitive) replaced, whitespace collapsed."""
    start = prompt.lower().find(concept.lower())
    if start < 0:
        raise ValueError(f"prompt {prompt!r} does not contain the concept {concept!r}")
    return " ".join((prompt[:start] + replacement + prompt[start + len(concept):]).split())


def request_prompts_with(context: ObjectiveContext, replacement: str,
                         concepts: Sequence[str] | None = None) -> list[str]:
    """The request's prompts with their concept replaced by ``replacement`` ("" takes it out), one to one with
    ``context.prompts``. One concept (``concepts`` None: the request's): its templates filled with the replacement,
    or each prompt with the concept swapped. Several (a request that removes them at once): each prompt's own
    concept is swapped, the longest match first (a concept that contains another, "neon dots" / "dots", wins)."""
    if concepts is None:
        if len(context.removed) > 1:  # a request of several concepts: each prompt's own is swapped
            concepts = context.removed
        elif context.templates is not None:
            return [" ".join(template.format(replacement).split()) for template in context.templates]
        else:
            concepts = [context.concept]
    return [swap_concept(prompt, prompt_concept(prompt, concepts), replacement) for prompt in context.prompts]


def prompt_concept(prompt: str, concepts: Sequence[str]) -> str:
    """The concept a prompt of a several-concept request names: the longest of ``concepts`` it contains
    (case-insensitive), so that "neon dots" wins over "dots".

    Args:
        prompt: one of the request's prompts.
        concepts: the request's concepts.

    Returns:
        That concept.

    Raises:
        ValueError: the prompt contains none of them.
    """
    found = next((c for c in sorted(concepts, key=len, reverse=True) if c.lower() in prompt.lower()), None)
    if found is None:
        raise ValueError(f"prompt {prompt!r} contains none of the concepts {list(concepts)}: the method swaps "
                         f"the concept out of each prompt")
    return found


def prompts_by_concept(prompts: Sequence[str], concepts: Sequence[str]) -> dict[str, list[str]]:
    """A several-concept request's prompts, grouped by the concept each names (``prompt_concept``), in order:
    ``["dots art", "neon dots art"]`` over ``["dots", "neon dots"]`` gives ``{"dots": ["dots art"], "neon dots":
    ["neon dots art"]}``.

    Args:
        prompts: the request's prompts.
        concepts: its concepts.

    Returns:
        ``{concept: its prompts}`` for every concept, in the order of ``concepts``.

    Raises:
        ValueError: a prompt names none of the concepts, or a concept is named by no prompt.
    """
    groups: dict[str, list[str]] = {c: [] for c in concepts}
    for prompt in prompts:
        groups[prompt_concept(prompt, concepts)].append(prompt)
    empty = [c for c, ps in groups.items() if not ps]
    if empty:
        raise ValueError(f"no prompt names {empty} (each prompt names its longest concept)")
    return groups


def check_concepts(concepts: Any, exclude: str | None = None) -> tuple[str, ...] | None:
    """A config's ``concepts`` (the concepts a several-concept request's prompts contain): None or a non-empty
    list of concepts, none of them ``exclude`` (an anchor)."""
    if concepts is None:
        return None
    if isinstance(concepts, str) or not concepts:
        raise ValueError(f"concepts must be a non-empty list of the concepts the prompts contain, got {concepts!r}")
    checked = tuple(check_concept(c, "each of concepts") for c in concepts)
    if exclude is not None and any(same_concept(c, exclude) for c in checked):
        raise ValueError(f"anchor {exclude!r} is one of the concepts being removed {list(checked)}")
    return checked


@dataclass
class SolveContext:
    """What the trainer gives a solved method for one request.

    Args:
        pipe: the pipeline, its denoiser's K/V weights holding the start model (the earlier requests folded in, or
            the base for a merge strategy).
        concept: the concept removed (for a request of several, their label).
        domain: the request's prompt domain.
        prompts: the request's prompts.
        base_weights: each K/V layer's base weight, by layer name.
        start_offsets: each K/V layer's start model minus its base (None: the request starts at the base).
        earlier: the ledger records of the requests before this one, in order.
        seed: the request's seed.
        progress: show progress bars.
        concepts: every concept the request removes (empty: ``(concept,)``), to be solved together.
    """

    pipe: Any
    concept: str
    domain: str
    prompts: list[str]
    base_weights: Mapping[str, torch.Tensor]
    start_offsets: Mapping[str, torch.Tensor] | None
    earlier: Sequence[Any]
    seed: int = 0
    progress: bool = False
    concepts: tuple[str, ...] = ()

    @property
    def removed(self) -> tuple[str, ...]:
        """Every concept the request removes: ``concepts``, or ``(concept,)``."""
        return tuple(self.concepts) or (self.concept,)


class Objective(ABC):
    """One unlearning method: a ``TrainedObjective`` or a ``SolvedObjective``, registered with its config class by
    ``register_objective``. The trainer picks the kind by the registered class.

    Args:
        config: the method's settings (an instance of ``config_class``).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    def __init__(self, config: ObjectiveConfig):
        self.config = config


class SolvedObjective(Objective):
    """A method whose change is computed, not trained (a closed-form edit): ``solve`` returns the artifact.

    Subclass it, implement ``solve``, and register it with its config class; ``pipe.unlearn(method=...)`` then
    records, saves, audits and rolls back its requests like any other.

    Args:
        config: the method's settings (an instance of ``config_class``).
    """

    @abstractmethod
    def solve(self, context: SolveContext) -> tuple[RequestAdapter, dict[str, Any]]:
        """One request's change.

        Args:
            context: the request and the model as the request finds it.

        Returns:
            The request's artifact (its change of every K/V layer in ``context.base_weights``) and a report, a
            JSON-ready dict the ledger keeps with the record.
        """

    def after_rollback(self, context: SolveContext) -> RequestAdapter | None:
        """Called for each request of this method that follows a rolled-back one, in ledger order.

        A solve that depends on the requests before it (it keeps them, or starts from them) is stale once one of
        them is gone; this returns its new artifact, solved in ``context`` (the requests that remain before it, with
        any re-solved ones). Default: None, the stored artifact stays.

        Args:
            context: the request (from its ledger record) and the model as it now finds it.

        Returns:
            The new artifact, or None to keep the stored one.
        """
        return None


class TrainedObjective(Objective):
    """A method trained on losses: the trainer runs the optimisation loop on what it returns.

    Args:
        config: the method's settings (an instance of ``config_class``).
        context: the request's model, prompts and generator, as the trainer gives them.
    """

    def __init__(self, config: ObjectiveConfig, context: ObjectiveContext):
        super().__init__(config)
        self.context = context

    @abstractmethod
    def prepare(self) -> None:
        """Sample whatever the losses need from the frozen model (called once, before training)."""

    @abstractmethod
    def training_loss(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """The loss of one training step on a random minibatch of ``batch_size`` (drawn with the context's
        generator).

        Args:
            batch_size: the global minibatch size.
            shard: ``(i, n)``: the loss of the i-th of n equal slices of that minibatch; every process draws the
                same global batch and trains on its own slice.

        Returns:
            The scalar loss, with gradients to the adapter.
        """

    @abstractmethod
    def trajectory_losses(self) -> Iterator[torch.Tensor]:
        """One loss per step of the cached trajectories, for importance scores accumulated over sampling."""

    def precompute_targets(self, calls: int, batch_size: int, shard: tuple[int, int] = (0, 1), *,
                           points_per_batch: int = 16, progress: bool = False) -> int:
        """Optional: compute, before training, whatever the next ``calls`` training losses would compute frozen,
        so that a training step costs one forward and one backward pass.

        Args:
            calls: how many ``training_loss`` calls to prepare for.
            batch_size: their ``batch_size``.
            shard: their ``shard``.
            points_per_batch: trajectory points per batched frozen pass.
            progress: show a progress bar.

        Returns:
            How many targets it computed (default: 0, nothing to precompute).
        """
        return 0


class TrajectoryObjective(TrainedObjective):
    """Shared machinery: sample trajectories with the frozen model for ``sampling prompts``, train the prediction
    for ``training prompts`` on those latents toward a frozen target computed once per (step, trajectory).

    Args:
        config: the method's settings (a ``TrainedObjectiveConfig`` or subclass).
        context: the request's model, prompts and generator, as the trainer gives them.
    """

    def sampling_prompts(self) -> list[str]:
        """The prompts the frozen model's trajectories are sampled with (default: the request's prompts).

        Returns:
            One prompt per trajectory slot; trajectory i uses prompt ``i % len(prompts)``.
        """
        return self.context.prompts

    def training_prompts(self) -> list[str]:
        """The prompts whose prediction is trained on those trajectories (default: the request's prompts).

        Returns:
            As many prompts as ``sampling_prompts``, in the same order.
        """
        return self.context.prompts

    @abstractmethod
    def frozen_target(self, latents: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Target noise prediction, computed under ``context.frozen()`` for trajectory ``rows``.

        Args:
            latents: the trajectory latents x_t, one per row.
            timesteps: the scheduler timestep of each latent.
            rows: the trajectory index of each latent (selects its prompts' conditioning).

        Returns:
            The target prediction, shaped like ``latents``.
        """

    def prepare(self) -> None:
        """Encode the prompts and sample the frozen model's trajectories (once per request, before training)."""
        ctx, cfg = self.context, self.config
        n = cfg.num_trajectories
        sampling, training = self.sampling_prompts(), self.training_prompts()
        self.rows_prompt = torch.arange(n) % len(sampling)
        self.sampling_cond = ctx.conditioner.encode(sampling).select(self.rows_prompt)
        self.training_cond = ctx.conditioner.encode(training).select(self.rows_prompt)
        self.uncond = ctx.conditioner.encode_unconditional(n)
        with ctx.frozen():
            self.latents, self.timesteps = sample_trajectory(
                ctx.conditioner,
                ctx.denoiser,
                self.sampling_cond,
                self.uncond,
                steps=cfg.sampling_steps,
                guidance_scale=cfg.guidance_scale,
                generator=ctx.generator,
                resolution=cfg.resolution,
                progress=ctx.progress,
                desc=f"sampling {n} trajector{'y' if n == 1 else 'ies'} of the frozen model",
            )
        # Frozen targets of trajectory points [steps, trajectories, ...], filled in batches by precompute_targets()
        # (or on first use); the table is allocated once the first target's shape is known.
        self._targets = torch.zeros(0)
        self._have_target = torch.zeros(len(self.timesteps), cfg.num_trajectories, dtype=torch.bool)
        self._prepare_preserved()

    def _prepare_preserved(self) -> None:
        """Encode the retain loss's prompts: kept concept k in the slot of trajectory prompt i is row k * n + i."""
        keep = tuple(getattr(self.config, "keep", ()))
        self.num_preserved = len(keep)
        if not keep:
            return
        ctx = self.context
        removed = getattr(self.config, "concepts", None) or ctx.removed
        clash = [c for c in keep if any(same_concept(c, r) for r in removed)]
        if clash:
            raise ValueError(f"keep lists {clash}, which this request removes ({list(removed)})")
        prompts = [p for concept in keep for p in request_prompts_with(ctx, concept, getattr(self.config,
                                                                                              "concepts", None))]
        self.preserved_cond = ctx.conditioner.encode(prompts)
        self._preserved_targets: dict[tuple[int, int, int], torch.Tensor] = {}  # (step, trajectory, kept) -> target

    def _preserved_rows(self, rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return kept * len(self.context.prompts) + self.rows_prompt[rows]

    def _preserved_targets_for(self, steps: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The frozen model's predictions for the kept concepts' prompts on these points, each computed once and
        kept by point (only the points training draws: a dense table over every kept concept would not fit at SD
        sizes)."""
        points = [(int(s), int(r), int(k)) for s, r, k in zip(steps, rows, kept)]
        missing = sorted({p for p in points if p not in self._preserved_targets})
        if missing:
            s, r, k = torch.tensor(missing).T
            ctx = self.context
            with torch.no_grad(), ctx.frozen():
                values = ctx.conditioner.predict(ctx.denoiser, self.latents[s, r], self.timesteps[s],
                                                 cond_rows(self.preserved_cond, self._preserved_rows(r, k))).float()
            self._preserved_targets.update(zip(missing, values))
        return torch.stack([self._preserved_targets[p] for p in points])

    def _store_targets(self, steps: torch.Tensor, rows: torch.Tensor) -> None:
        """Compute the frozen targets of the points ``(steps[i], rows[i])`` in one no-grad batch and store them."""
        with torch.no_grad(), self.context.frozen():
            values = self.frozen_target(self.latents[steps, rows], self.timesteps[steps], rows).float()
        if self._targets.numel() == 0:
            self._targets = values.new_zeros((len(self.timesteps), self.config.num_trajectories, *values.shape[1:]))
        self._targets[steps, rows] = values
        self._have_target[steps, rows] = True

    def _store_missing(self, wanted: torch.Tensor, points_per_batch: int = 16, progress: bool = False) -> int:
        points = (wanted & ~self._have_target).nonzero()
        if not len(points):
            return 0
        chunks = torch.split(points, points_per_batch)
        for chunk in tqdm(chunks, desc="frozen targets", disable=not progress, leave=False):
            self._store_targets(chunk[:, 0], chunk[:, 1])
        return len(points)

    def targets_at(self, step: int) -> torch.Tensor:
        """Frozen targets of every trajectory at trajectory step ``step`` (computed once per request).

        Args:
            step: index into the sampled trajectory steps.

        Returns:
            The targets of all trajectories at that step, one row per trajectory.
        """
        wanted = torch.zeros_like(self._have_target)
        wanted[step] = True
        self._store_missing(wanted)
        return self._targets[step]

    def precompute_targets(self, calls: int, batch_size: int, shard: tuple[int, int] = (0, 1), *,
                           points_per_batch: int = 16, progress: bool = False) -> int:
        """Compute, in batched no-grad passes, the frozen targets of every trajectory point that the next ``calls``
        calls of ``training_loss(batch_size, shard)`` will draw, so that a training step pays no frozen pass.

        The points are found by replaying the draws on a copy of the context's generator: training then draws the
        same points as without this call.

        Args:
            calls: how many ``training_loss`` calls to prepare for.
            batch_size: their ``batch_size``.
            shard: their ``shard``.
            points_per_batch: trajectory points per batched frozen pass.
            progress: show a progress bar.

        Returns:
            The number of targets computed (points already stored are not counted).
        """
        replay = torch.Generator().set_state(self.context.generator.get_state())
        wanted = torch.zeros_like(self._have_target)
        part = _shard_slice(batch_size, shard)
        preserved = []
        for _ in range(calls):
            steps, rows, kept = self._draw(batch_size, replay)
            wanted[steps[part], rows[part]] = True
            if kept is not None:
                preserved.append(torch.stack([steps[part], rows[part], kept[part]], dim=1))
        done = self._store_missing(wanted, points_per_batch, progress)
        if preserved:  # _preserved_targets_for computes only the points it does not have yet
            before = len(self._preserved_targets)
            for chunk in tqdm(torch.split(torch.unique(torch.cat(preserved), dim=0), points_per_batch),
                              desc="frozen targets (kept concepts)", disable=not progress, leave=False):
                self._preserved_targets_for(chunk[:, 0], chunk[:, 1], chunk[:, 2])
            done += len(self._preserved_targets) - before
        return done

    def _draw(self, batch_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Trajectory steps and rows of a minibatch, and, with a retain loss, the kept concept of each element."""
        steps = torch.randint(0, len(self.timesteps), (batch_size,), generator=generator)
        rows = torch.randint(0, self.config.num_trajectories, (batch_size,), generator=generator)
        kept = torch.randint(0, self.num_preserved, (batch_size,), generator=generator) if self.num_preserved else None
        return steps, rows, kept

    def _loss(self, steps: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        latents = self.latents[steps, rows]
        timesteps = self.timesteps[steps]
        if not bool(self._have_target[steps, rows].all()):
            wanted = torch.zeros_like(self._have_target)
            wanted[steps, rows] = True
            self._store_missing(wanted)
        target = self._targets[steps, rows]
        cond = cond_rows(self.training_cond, rows)
        if kept is None:
            prediction = self.context.conditioner.predict(self.context.denoiser, latents, timesteps, cond)
            return F.mse_loss(prediction.float(), target)
        # the erased and the kept prompts on the same x_t, in one forward pass
        kept_target = self._preserved_targets_for(steps, rows, kept)
        both = Conditioning.cat([cond, cond_rows(self.preserved_cond, self._preserved_rows(rows, kept))])
        prediction = self.context.conditioner.predict(
            self.context.denoiser, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both).float()
        erased, kept_prediction = prediction.chunk(2)
        return F.mse_loss(erased, target) + self.config.keep_weight * F.mse_loss(kept_prediction, kept_target)

    def training_loss(self, batch_size: int, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Mean squared error to the frozen targets on a random minibatch, plus the weighted retain loss if any.

        Args:
            batch_size: the global minibatch size (trajectory points drawn with the context's generator).
            shard: ``(i, n)``: the loss of the i-th of n equal slices of that minibatch.

        Returns:
            The scalar loss, with gradients to the adapter.
        """
        steps, rows, kept = self._draw(batch_size, self.context.generator)
        part = _shard_slice(batch_size, shard)
        return self._loss(steps[part], rows[part], None if kept is None else kept[part])

    def trajectory_losses(self) -> Iterator[torch.Tensor]:
        """The erasure loss alone (selective fine-tuning scores what the removal needs, not the retain loss)."""
        rows = torch.arange(self.config.num_trajectories)
        self._store_missing(torch.ones_like(self._have_target))  # every point is visited: batch the frozen passes
        for step in range(len(self.timesteps)):
            yield self._loss(torch.full_like(rows, step), rows)


def _shard_slice(batch_size: int, shard: tuple[int, int]) -> slice:
    index, count = shard
    return slice(index * batch_size // count, (index + 1) * batch_size // count)


OBJECTIVES: dict[str, tuple[type[ObjectiveConfig], type[Objective]]] = {}


def register_objective(config_class: type[ObjectiveConfig], objective_class: type[Objective]) -> None:
    """Make ``config_class.method`` usable as ``pipe.unlearn(..., method=name)``.

    Args:
        config_class: the method's settings (a dataclass with a ``method`` name).
        objective_class: a ``TrainedObjective`` (trained by the trainer's loop) or a ``SolvedObjective`` (its
            ``solve`` gives the change); the kind is read from the class.

    Raises:
        ValueError: no method name, or the name is registered already.
        TypeError: ``objective_class`` is neither kind.
    """
    name = config_class.method
    if not (isinstance(objective_class, type) and issubclass(objective_class, (TrainedObjective, SolvedObjective))):
        raise TypeError(f"objective_class must subclass TrainedObjective or SolvedObjective, got {objective_class!r}")
    if not name:
        raise ValueError(f"{config_class.__name__}.method must name the method")
    if name in OBJECTIVES:
        registered = OBJECTIVES[name][1]
        raise ValueError(
            f"method {name!r} is already registered (by {registered.__module__}.{registered.__name__}); "
            f"pick another name. Registered methods: {sorted(OBJECTIVES)}"
        )
    objective_class.config_class = config_class
    OBJECTIVES[name] = (config_class, objective_class)


def build_objective_config(method: str | ObjectiveConfig, options: dict[str, Any] | None = None) -> ObjectiveConfig:
    """A method name plus options, or a ready config, as a validated config object.

    Args:
        method: a registered method name, or a ready config (then without options).
        options: the config's fields by name; a renamed option's old name is taken with a ``FutureWarning``.

    Returns:
        The method's config.

    Raises:
        ValueError: an unknown method, or an option out of range.
        TypeError: an unknown option, options beside a ready config, or an old name beside its new one.
    """
    options = dict(options or {})
    if isinstance(method, ObjectiveConfig):
        if options:
            raise TypeError(f"options {sorted(options)} given together with a ready {type(method).__name__}")
        return method
    if not isinstance(method, str) or method not in OBJECTIVES:
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(OBJECTIVES)}")
    config_class = OBJECTIVES[method][0]
    options = rename_options(f"method {method!r}", config_class.renamed_options, options)
    allowed = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"method {method!r} has no option(s) {unknown}; allowed: {sorted(allowed)}")
    return config_class(**options)


def stored_method_config(method: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A method config as a ledger record stores it, with the option names of earlier versions replaced by the
    current ones, silently: a ledger saved by an earlier version loads without a warning and compares equal to a
    request made with the new names.

    Args:
        method: the record's method (an unregistered one is left for the ledger's check to refuse).
        config: the record's ``method_config``.

    Returns:
        A new dict under the current names.

    Raises:
        TypeError: an old name beside its new one.
    """
    registered = OBJECTIVES.get(method)
    renamed = registered[0].renamed_options if registered is not None else {}
    return rename_options(method, renamed, config, warn=False)


def objective_class(config: ObjectiveConfig | str) -> type[Objective]:
    """The class registered for a method config or name (``TrainedObjective`` or ``SolvedObjective``).

    Args:
        config: a method config, or a method name such as "esd".

    Returns:
        The objective class registered for that method.

    Raises:
        ValueError: the method is not registered.
    """
    name = config if isinstance(config, str) else config.method
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name][1]


def objective_for(config: ObjectiveConfig, context: ObjectiveContext) -> TrainedObjective:
    """The trained method of ``config``, ready for the trainer's loop.

    Args:
        config: the request's method config.
        context: what the trainer gives the objective for this request.

    Returns:
        The objective instance (``prepare`` not yet called).

    Raises:
        TypeError: the method is solved, not trained.
    """
    cls = objective_class(config)
    if not issubclass(cls, TrainedObjective):
        raise TypeError(f"method {config.method!r} is solved, not trained: it has no training losses")
    return cls(config, context)


def cond_rows(cond: Conditioning, rows: torch.Tensor) -> Conditioning:
    return cond.select(rows.to(cond.hidden_states.device))
