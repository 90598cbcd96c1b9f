"""Named removal streams that mix domains: styles and objects removed one request after another, in a stated order.

A stream names its removals (``(domain, concept)`` in order), the kept concepts retention is scored on, and the
kept concepts protocols may be told to keep (``protected``: never scored). ``stream_world`` turns a world into the
stream's: its evaluation holds the removals and the scored kept concepts (kept first, so held-out images draw kept
concepts of the other domain), and what a protocol may keep is the world's auxiliary set less every one of them
(``BenchWorld``'s honest split). One ``register_stream(Stream(...))`` line adds a stream; a name is registered once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import minicanvas as mc
from ..evaluation.metrics import DOMAINS, check_eval_domain
from ..prompts import same_concept
from .world import BenchWorld, minicanvas_world


@dataclass(frozen=True)
class Stream:
    """A mixed removal stream.

    Args:
        name: what ``bench --stream`` takes.
        description: one line for the report.
        requests: ``(domain, concept)`` per request, in order; a concept appears once.
        kept: per domain, the kept concepts retention is scored on (IRA: styles, CRA: objects); never removed, never
            protected.
        protected: per domain, kept concepts of the world that protocols may be told to keep (and request prompts
            may use); never scored. The world's auxiliary words outside its concepts are protected too.
        prompt_concepts: per domain, what the other domain's request prompts are written with (e.g. objects for a
            style request); each must be neither removed nor scored. Missing domain: the world's choice among the
            concepts outside the evaluation.
    """

    name: str
    description: str
    requests: tuple[tuple[str, str], ...]
    kept: Mapping[str, tuple[str, ...]]
    protected: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    prompt_concepts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or " " in self.name:
            raise ValueError(f"stream name must be a non-empty word, got {self.name!r}")
        if not self.requests:
            raise ValueError(f"stream {self.name!r} has no requests")
        for part in ("kept", "protected", "prompt_concepts"):
            unknown = sorted(set(getattr(self, part)) - set(DOMAINS))
            if unknown:
                raise ValueError(f"stream {self.name!r}: {part} domains must be 'style' / 'object', got {unknown}")
        for request in self.requests:
            if not (isinstance(request, tuple) and len(request) == 2):
                raise ValueError(f"stream {self.name!r}: a request is (domain, concept), got {request!r}")
            check_eval_domain(request[0])
        concepts = [c for _, c in self.requests]
        repeated = sorted({c for c in concepts if sum(same_concept(c, d) for d in concepts) > 1})
        if repeated:
            raise ValueError(f"stream {self.name!r} removes {repeated} more than once")
        for domain in DOMAINS:
            removed, kept, protected = self.removed(domain), self.kept_concepts(domain), self.protected_concepts(domain)
            for what, names, others in (("kept", kept, removed), ("protected", protected, [*removed, *kept])):
                overlap = sorted({c for c in names if any(same_concept(c, o) for o in others)})
                if overlap:
                    raise ValueError(f"stream {self.name!r}: {what} {domain}s {overlap} are also removed or scored; "
                                     f"a {what} concept is neither removed nor scored elsewhere")
            used = [c for c in self.prompt_concepts.get(domain, ())
                    if any(same_concept(c, o) for o in [*removed, *kept])]
            if used:
                raise ValueError(f"stream {self.name!r}: request prompts may not be written with removed or scored "
                                 f"{domain}s {used}")

    def removed(self, domain: str) -> list[str]:
        """The domain's removals, in stream order.

        Args:
            domain: "style" or "object".

        Returns:
            The concepts of that domain the stream removes.
        """
        return [c for d, c in self.requests if d == check_eval_domain(domain)]

    def kept_concepts(self, domain: str) -> list[str]:
        """The domain's kept concepts that are scored (never protected).

        Args:
            domain: "style" or "object".

        Returns:
            The scored kept concepts.
        """
        return list(self.kept.get(check_eval_domain(domain), ()))

    def protected_concepts(self, domain: str) -> list[str]:
        """The domain's kept concepts that protocols may keep (never scored).

        Args:
            domain: "style" or "object".

        Returns:
            The protected concepts.
        """
        return list(self.protected.get(check_eval_domain(domain), ()))

    def head(self, requests: int | None) -> list[tuple[str, str]]:
        """The stream's first requests.

        Args:
            requests: how many (None: all of them).

        Returns:
            ``(domain, concept)`` pairs in stream order.

        Raises:
            ValueError: a count that is not between 1 and the stream's length.
        """
        if requests is None:
            return list(self.requests)
        if not isinstance(requests, int) or isinstance(requests, bool) or not 1 <= requests <= len(self.requests):
            raise ValueError(f"stream {self.name!r} has {len(self.requests)} requests; asked for the first "
                             f"{requests!r}: use 1 to {len(self.requests)}")
        return list(self.requests[:requests])

    def describe(self) -> dict[str, Any]:
        """The stream as the report records it: name, description, requests, kept and protected sets.

        Returns:
            JSON-ready values.
        """
        return {"name": self.name, "description": self.description,
                "requests": [list(r) for r in self.requests],
                "kept": {d: self.kept_concepts(d) for d in DOMAINS},
                "protected": {d: self.protected_concepts(d) for d in DOMAINS}}


STREAMS: dict[str, Stream] = {}


def register_stream(stream: Stream) -> Stream:
    """Add ``stream`` to ``STREAMS`` under its name.

    Args:
        stream: the stream.

    Returns:
        The stream.

    Raises:
        ValueError: a stream of that name is registered already.
    """
    if stream.name in STREAMS:
        raise ValueError(f"stream {stream.name!r} is registered already")
    STREAMS[stream.name] = stream
    return stream


def get_stream(name: str | Stream) -> Stream:
    """A registered stream by name.

    Args:
        name: a name of ``STREAMS``, or a ``Stream`` (returned as it is: an unregistered stream runs too).

    Returns:
        The stream.

    Raises:
        ValueError: no stream of that name, with the registered names.
    """
    if isinstance(name, Stream):
        return name
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; registered: {sorted(STREAMS)}")
    return STREAMS[name]


def stream_world(world: BenchWorld, stream: Stream | str, auxiliary: Mapping[str, Sequence[str]] | None = None
                 ) -> BenchWorld:
    """``world`` evaluated on ``stream``: removals and scored kept concepts, the removal order of each domain, and
    what protocols may keep.

    Args:
        world: the world (its models, classifiers, sampling and held-out wordings are kept).
        stream: a ``Stream`` or a registered name.
        auxiliary: the world's whole auxiliary set (None: ``world.auxiliary``, else every concept of the world); less
            every removed or scored concept of the stream, plus its protected concepts, it is what protocols may keep.

    Returns:
        A new ``BenchWorld``: evaluated styles and objects are each domain's scored kept concepts, then its removals
        in stream order.

    Raises:
        ValueError: a stream concept that is not one of the world's, or a protected set that names a scored concept.
    """
    stream = get_stream(stream)
    for domain in DOMAINS:
        names = [*stream.removed(domain), *stream.kept_concepts(domain), *stream.protected_concepts(domain)]
        unknown = [c for c in names if c not in world.concepts(domain)]
        if unknown:
            raise ValueError(f"stream {stream.name!r} names {domain}s {unknown} that world {world.name!r} has not")
    evaluated = {d: [*stream.kept_concepts(d), *stream.removed(d)] for d in DOMAINS}
    every = [c for d in DOMAINS for c in evaluated[d]]
    pool = auxiliary if auxiliary is not None else (
        world.auxiliary if world.auxiliary is not None else {d: world.concepts(d) for d in DOMAINS})
    protected = {d: list(dict.fromkeys([*[c for c in pool.get(d, []) if not any(same_concept(c, e) for e in every)],
                                        *stream.protected_concepts(d)])) for d in DOMAINS}
    prompts = dict(world.prompt_concepts or {})
    prompts.update({d: list(c) for d, c in stream.prompt_concepts.items()})
    for domain in DOMAINS:
        prompts.setdefault(domain, [c for c in world.concepts(domain) if c not in every])
    anchors = {d: a for d, a in world.anchors.items() if not any(same_concept(a, e) for e in every)}
    config = dataclasses.replace(world.eval_config, styles=evaluated["style"], objects=evaluated["object"])
    orders = {d: stream.removed(d) or evaluated[d] for d in DOMAINS}
    return dataclasses.replace(world, eval_config=config, orders=orders,
                               auxiliary=protected, prompt_concepts=prompts, anchors=anchors)


def minicanvas_stream_world(stream: Stream | str = "mixed36", weights_dir: str | os.PathLike | None = None,
                            eval_seeds: int | None = None, eval_steps: int | None = None, batch_size: int = 32,
                            device: str | None = None, heldout: bool = True) -> BenchWorld:
    """The shipped MiniCanvas model evaluated on a stream (``stream_world``), protocols keeping
    ``minicanvas.auxiliary_concepts()`` less the stream's removed and scored concepts.

    Args:
        stream: a ``Stream`` or a registered name.
        weights_dir: MiniCanvas weights folder (None: the shipped one).
        eval_seeds: the first n of MiniCanvas's evaluation seeds (None: 2).
        eval_steps: sampling steps of the evaluation and of the requests' trajectories (None: MiniCanvas's).
        batch_size: images per pipeline call.
        device: where the pipeline and classifiers run.
        heldout: score the removed concepts in MiniCanvas's held-out wordings too.

    Returns:
        The stream's ``BenchWorld``.
    """
    world = minicanvas_world(weights_dir=weights_dir, eval_seeds=eval_seeds, eval_steps=eval_steps,
                             batch_size=batch_size, device=device, heldout=heldout)
    return stream_world(world, stream, auxiliary=mc.auxiliary_concepts())


# MiniCanvas's mixed36: 30 of the 48 styles and 6 of the 12 objects, interleaved (an object at requests 3, 9, ..., 33).
# Styles: each family's first and third member, and the fourth of every other family, one family after another (the
# first 12 requests' styles are the 12-request bench's); kept and scored: each family's second member, and the fourth
# (desert: the third) of the six families that lose two, so every family and every texture word has members both
# removed and kept. Objects: three kept and scored, three kept and protected (the style requests' prompts draw them).
# Object requests' prompts are written with MiniCanvas's auxiliary family x texture pairs that are not styles
# ("neon checks"): every style is removed or scored.
MIXED36_ORDER: tuple[tuple[str, str], ...] = (
    ("style", "neon lines"), ("style", "pastel waves"), ("object", "cat"), ("style", "ink sketch"),
    ("style", "sunset gradient"), ("style", "forest hatching"), ("style", "ocean waves"), ("style", "desert dots"),
    ("object", "tree"), ("style", "candy checks"), ("style", "metal grid"), ("style", "ember gradient"),
    ("style", "frost mosaic"), ("style", "retro checks"), ("object", "boat"), ("style", "neon dots"),
    ("style", "pastel checks"), ("style", "ink hatching"), ("style", "sunset lines"), ("style", "forest wash"),
    ("object", "tower"), ("style", "ocean rings"), ("style", "desert sketch"), ("style", "candy zigzag"),
    ("style", "metal mosaic"), ("style", "ember wash"), ("object", "cup"), ("style", "frost grid"),
    ("style", "retro hatching"), ("style", "pastel rings"), ("style", "sunset zigzag"), ("style", "ocean mosaic"),
    ("object", "bird"), ("style", "candy dots"), ("style", "ember rings"), ("style", "retro gradient"),
)
MIXED36_KEPT: dict[str, tuple[str, ...]] = {
    "style": ("neon waves", "neon grid", "pastel dots", "ink wash", "ink lines", "sunset mosaic", "forest rings",
              "forest zigzag", "ocean gradient", "desert zigzag", "desert checks", "candy grid", "metal hatching",
              "metal sketch", "ember lines", "frost sketch", "frost wash", "retro waves"),
    "object": ("bear", "fish", "house"),
}
MIXED36_PROTECTED: dict[str, tuple[str, ...]] = {"style": (), "object": ("car", "flower", "mushroom")}
_PAIRS = tuple(c for c in mc.auxiliary_concepts()["style"] if c not in mc.STYLES and len(c.split()) == 2)

register_stream(Stream("mixed36", "30 style and 6 object requests interleaved on MiniCanvas", MIXED36_ORDER,
                       MIXED36_KEPT, MIXED36_PROTECTED, {"style": _PAIRS, "object": MIXED36_PROTECTED["object"]}))
