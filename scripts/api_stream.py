"""A stream of removals through the public API, scored on concepts nobody named: the retention issue's regimes.

    # nothing named: pipe.unlearn(style, domain="style") and nothing else, the bench's order and its reverse
    python scripts/api_stream.py --out docs/bench/api-nothing-named
    python scripts/api_stream.py --reverse --out docs/bench/api-nothing-named-reversed
    # a protected half named: the kept styles of the first 6 families and 6 objects passed as keep=; scored on
    # the other families' kept styles and the other objects
    python scripts/api_stream.py --half-named --out docs/bench/api-half-named
    # another recipe: any unlearn() keyword as JSON, e.g. a bounded closed form
    python scripts/api_stream.py --set method='"closed_form"' --set ridge=0.01
    # the closed form protecting the package's generic set (diffusers_unlearn.generic_vocabulary) instead of the
    # built-in vocabulary, without the phrases that name a scored concept
    python scripts/api_stream.py --vocabulary generic:2000 --hold-out
    # trained gradient projection, its neighbours drawn from the generic set; ESD with a retain loss on the
    # generic set's 16 nearest concepts of each target
    python scripts/api_stream.py --set method='"esd"' --regularizer gradient_projection='{"neighbors": 64,
        "vocabulary": "generic-style"}' --hold-out
    python scripts/api_stream.py --set method='"esd"' --nearest 16 --nearest-pool generic-style:2000 --hold-out

Each request is ``pipe.unlearn(style, domain="style", **options)`` on the shipped MiniCanvas model; the styles are
the bench's removal order (one per family), or ``--order``'s. ``--domain object`` removes objects instead (the first
6 of MiniCanvas's order); IRA is then over the kept objects and CRA over the styles. After the last request (and, with ``--every``, after each) it scores,
on MiniCanvas's classifiers and ``--eval-seeds`` seeds: UA, held-out UA, IRA and CRA over the scored concepts,
objects kept in the removed styles' prompts, kept-image change against the base in seed gaps, and a Fréchet
distance of the kept images' classifier features; each as a ratio to the base model's score on the same sets (its
IRA over the kept concepts only). Prints a JSON summary and writes it to ``--out/results.json``.

Protection sets, written as SPEC: "default" (the built-in ``DEFAULT_VOCABULARY``), "generic" (both domains of
``generic_vocabulary()``), "generic-style" / "generic-object" (one domain), "prompts" (``generic_prompts()`` in
the "concept" domain); ":N" keeps the first N of each; "+" joins them ("generic-style:3000+prompts:1000").

Honesty: before anything runs, every phrase the requests will protect is collected from the built requests
themselves (the closed form's vocabulary, the built-in one when none is given, and ``preserve``; gradient
projection's ``retain`` and its whole neighbour pool; a trained method's ``preserve``; ``keep=``). A scored concept
that any of them contains as a phrase (whole words, case-insensitive) is refused: reported, left out of scoring,
and replaced by an unprotected MiniCanvas concept of the same domain where one is left. ``--hold-out`` instead
takes out of the sets this script builds (``--vocabulary``, pools, ``--preserve-nearest``) every phrase that
contains a scored concept, so that the scored concepts stay the world's; ``--hold-out words`` every phrase that
shares a word with one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="stream length (default 12 styles, 6 objects)")
    parser.add_argument("--domain", choices=("style", "object"), default="style",
                        help="remove styles (the bench's order) or objects (MiniCanvas's order)")
    parser.add_argument("--reverse", action="store_true", help="remove in the reverse of the bench's order")
    parser.add_argument("--order", default=None, metavar="A,B,...",
                        help="remove these evaluated concepts instead, in this order (e.g. each family's kept style: "
                             "another split of removed and kept)")
    parser.add_argument("--half-named", action="store_true",
                        help="pass the kept styles of the first 6 families and 6 objects as keep=")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="an unlearn() keyword")
    parser.add_argument("--vocabulary", default=None, metavar="SPEC", help="vocabulary= (the closed form's kept set)")
    parser.add_argument("--regularizer", action="append", default=[], metavar="NAME=JSON",
                        help="a registered regularizer and its fields; a string vocabulary is a SPEC")
    parser.add_argument("--nearest", type=int, default=0, metavar="N",
                        help="the N concepts of --nearest-pool nearest to each request's concept ...")
    parser.add_argument("--nearest-pool", default="generic-style", metavar="SPEC")
    parser.add_argument("--nearest-by", choices=("embedding", "lexical"), default="embedding",
                        help="nearest by embedding cosine, or those sharing the most words first (then cosine)")
    parser.add_argument("--nearest-as", choices=("preserve", "retain", "both"), default="preserve",
                        help="... passed as preserve= (a retain loss, or the closed form's kept list) or as "
                             "gradient projection's retain= (exact invariants; needs --regularizer "
                             "gradient_projection)")
    parser.add_argument("--keep-parts", action="store_true",
                        help="add each word of a several-word concept to its nearest list (remove the phrase, not "
                             "its parts)")
    parser.add_argument("--hold-out", nargs="?", const="phrases", choices=("phrases", "words"), default=None,
                        help="drop from the sets built here every phrase that contains a scored concept "
                             "(phrases), or that shares a word with one (words)")
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--every", action="store_true", help="score after every request, not only the last")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base-cache", default="/tmp/api_stream_base", metavar="DIR",
                        help="keep the base model's evaluation images here, by evaluation config ('' to skip)")
    parser.add_argument("--dry-run", action="store_true", help="print what is protected and scored, and stop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    import diffusers_unlearn as du
    from diffusers_unlearn.bench.heldout import heldout_unlearning
    from diffusers_unlearn.bench.world import minicanvas_world
    from diffusers_unlearn.evaluation import EvalReference, evaluate_unlearning, kv_drift
    from diffusers_unlearn.families.registry import family_of

    torch.set_num_threads(args.threads)
    options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    domain = args.domain
    other = "object" if domain == "style" else "style"
    if args.requests is None:
        args.requests = 12 if domain == "style" else 6
    if args.half_named and domain != "style":
        raise SystemExit("--half-named names kept styles of 6 families: style streams only")
    order = [c.strip() for c in args.order.split(",")] if args.order else None
    if order is not None:
        args.requests = min(args.requests, len(order))
    world = minicanvas_world(eval_seeds=args.eval_seeds, eval_steps=args.eval_steps, domain=domain, order=order)
    stream = world.stream(domain, args.requests)
    if args.reverse:
        stream = stream[::-1]
    mc = du.minicanvas
    keep: dict[str, list[str]] | None = None
    evaluated = {"style": list(world.eval_config.styles), "object": list(world.eval_config.objects)}
    # the kept concepts the world scores: the stream's domain less the stream, and the other domain
    world_kept = {domain: [c for c in evaluated[domain] if c not in stream], other: evaluated[other]}
    world_styles, world_objects = world_kept["style"], world_kept["object"]
    if args.half_named:
        families = list(mc.STYLE_FAMILIES.values())
        named_styles = [s for members in families[:6] for s in members if s not in stream]
        # the objects the evaluation does not draw, then others, up to 6; the rest are scored
        named_objects = [o for o in mc.OBJECTS if o not in world_objects][:6]
        keep = {"style": named_styles, "object": named_objects}
    # the concepts the world scores (before any refusal): what --hold-out keeps out of the sets built here
    hold = [*world_styles, *world_objects] if args.hold_out else []
    held_out: dict[str, int] = {}

    def resolve(spec: str) -> dict[str, list[str]]:
        vocabulary = protection_set(spec)
        if hold:
            if args.hold_out == "words":
                words = {w for h in hold for w in h.lower().split()}
                hit = lambda c: any(contains(c, w) for w in words)  # noqa: E731
            else:
                hit = lambda c: any(contains(c, h) for h in hold)  # noqa: E731
            dropped = {d: [c for c in cs if hit(c)] for d, cs in vocabulary.items()}
            vocabulary = {d: [c for c in cs if c not in set(dropped[d])] for d, cs in vocabulary.items()}
            held_out[spec] = sum(len(v) for v in dropped.values())
        return vocabulary

    if args.vocabulary:
        options["vocabulary"] = resolve(args.vocabulary)
    regularizers = []
    for item in args.regularizer:
        name, _, text = item.partition("=")
        fields = json.loads(text) if text else {}
        if isinstance(fields.get("vocabulary"), str):
            fields["vocabulary"] = resolve(fields["vocabulary"])
        regularizers.append(du.regularizers.REGULARIZERS[name](**fields))
    if regularizers:
        options["regularizers"] = regularizers

    pipe = du.attach(world.load_pipeline())
    family = family_of(pipe)
    preserve_nearest: dict[str, list[str]] = {}
    nearest_seconds: dict[str, float] = {}  # the neighbour search (the pool's embeddings on the first): request time
    if args.nearest or args.keep_parts:
        pool = resolve(args.nearest_pool) if args.nearest else {}
        for k, style in enumerate(stream):
            started = time.perf_counter()
            parts = [w for w in style.split() if len(style.split()) > 1] if args.keep_parts else []
            found = nearest(pipe, style, domain, pool, args.nearest, taken=stream[:k + 1],
                            lexical=args.nearest_by == "lexical") if args.nearest else []
            preserve_nearest[style] = list(dict.fromkeys([*parts, *found]))
            nearest_seconds[style] = time.perf_counter() - started

    def request_options(k: int, style: str) -> dict[str, Any]:
        extra: dict[str, Any] = {"keep": keep} if keep else {}
        if preserve_nearest and args.nearest_as in ("preserve", "both"):
            extra["preserve"] = [*options.get("preserve", []), *preserve_nearest[style]]
        if preserve_nearest and args.nearest_as in ("retain", "both"):
            projections = [r for r in options.get("regularizers", []) if r.name == "gradient_projection"]
            if not projections:
                raise SystemExit("--nearest-as retain needs --regularizer gradient_projection=...")
            extra["regularizers"] = [dataclasses.replace(r, retain=[*r.retain, *preserve_nearest[style]])
                                     if r.name == "gradient_projection" else r for r in options["regularizers"]]
        return {**options, **extra}

    # every phrase any request will protect, read from the requests as the library builds them
    protected: set[str] = set()
    for k, style in enumerate(stream):
        built = du.UnlearnRequest.build(style, domain=domain, seed=k, family=family, **request_options(k, style))
        protected |= set(protected_phrases(built))
    protected_list = sorted(protected)
    named = {d: [] if keep is None else keep[d] for d in ("style", "object")}  # left out by design, not refused
    refused = {"style": [c for c in world_styles if c not in named["style"] and is_protected(c, protected_list)],
               "object": [c for c in world_objects if c not in named["object"] and is_protected(c, protected_list)]}
    removed_protected = [c for c in stream if is_protected(c, protected_list)]
    spare_styles = [s for s in mc.STYLES if s not in stream and s not in world_styles]
    spare_objects = [o for o in mc.OBJECTS if o not in stream and o not in world_objects]
    kept_styles, substituted_styles = fill(world_styles, refused["style"], spare_styles, protected_list,
                                           named["style"])
    scored_objects, substituted_objects = fill(world_objects, refused["object"], spare_objects, protected_list,
                                               named["object"])
    # a named concept is protected, never scored: the kept concepts scored are the unnamed ones
    kept_styles = [s for s in kept_styles if s not in named["style"]]
    scored_objects = [o for o in scored_objects if o not in named["object"]]
    if not scored_objects or not kept_styles:
        raise SystemExit("these requests protect every MiniCanvas object or kept style: nothing left to score")
    overlap = [c for c in kept_styles + scored_objects if is_protected(c, protected_list)]
    scored_styles, scored_objects = ([*stream, *kept_styles], scored_objects) if domain == "style" \
        else (kept_styles, [*stream, *scored_objects])
    assert not overlap, overlap  # protected and scored must be disjoint
    honesty = {
        "protected_phrases": len(protected_list),
        "held_out": held_out,
        "refused": refused,
        "substituted": {"style": substituted_styles, "object": substituted_objects},
        "removed_concepts_protected_by_some_request": removed_protected,
    }
    if any(refused.values()):
        print(f"refused (protected by the requests, not scored): {refused}; scored instead: "
              f"{honesty['substituted']}", flush=True)
    if args.dry_run:
        print(json.dumps({"scored": {"style": scored_styles, "object": scored_objects}, **honesty,
                          "nearest": preserve_nearest}, indent=1))
        return 0
    config = world.eval_config
    config = type(config)(**{**config.to_dict(), "styles": scored_styles, "objects": scored_objects})

    cached = base_images(args.base_cache, config)
    base = evaluate_unlearning(pipe, [], domain, world.style_classifier, world.object_classifier, config,
                               progress=False, images=cached)
    if cached is None and args.base_cache:
        store_base_images(args.base_cache, config, base.images)
    reference = EvalReference.from_images(base.images, world.feature_extractor)
    rows = [{"request": 0, **{k: v for k, v in base.to_dict().items() if k not in ("config", "accuracy",
                                                                                 "cross_accuracy")}}]
    print(f"base: {base.summary()}", flush=True)
    request_seconds = []
    records = []
    for k, style in enumerate(stream):
        started = time.perf_counter()
        record = pipe.unlearn(style, domain=domain, seed=k, progress=False, **request_options(k, style))
        request_seconds.append(time.perf_counter() - started + nearest_seconds.get(style, 0.0))
        records.append({"concept": style, "method": record.method, "seconds": round(request_seconds[-1], 2),
                        **request_report(record)})
        if not args.every and k < len(stream) - 1:
            print(f"request {k + 1} {style!r}: {request_seconds[-1]:.1f}s", flush=True)
            continue
        removed = stream[: k + 1]
        scores = evaluate_unlearning(pipe, removed, domain, world.style_classifier, world.object_classifier, config,
                                     progress=False, reference=reference, feature_extractor=world.feature_extractor)
        heldout = heldout_unlearning(pipe, world, removed, domain)
        row = {"request": k + 1, "concept": style, "method": record.method,
               **{k_: v for k_, v in scores.to_dict().items() if k_ not in ("config",)},
               "ua_heldout": None if heldout is None else heldout["ua"], "drift": kv_drift(pipe),
               "request_seconds": round(request_seconds[-1], 2)}
        rows.append(row)
        print(f"request {k + 1} {style!r}: {scores.summary()}  held-out UA {row['ua_heldout']}  "
              f"drift {row['drift']:.3f}  {request_seconds[-1]:.1f}s", flush=True)
    final = rows[-1]
    # the base model's objects in the same removed styles' prompts: what "kept in removed" is compared with
    # the base model's scores on the final row's sets (its IRA over the kept concepts only, not the removed ones)
    base_final = evaluate_unlearning(None, stream, domain, world.style_classifier, world.object_classifier, config,
                                     images=base.images)
    base_removed = base_final.cross_removed
    summary = {
        "command": "python scripts/api_stream.py " + " ".join(
            ([f"--domain {domain}"] if domain != "style" else []) + (["--reverse"] if args.reverse else [])
            + ([f"--order {shlex.quote(args.order)}"] if args.order else [])
            + (["--half-named"] if args.half_named else [])
            + [f"--set {shlex.quote(s)}" for s in args.set]
            + ([f"--vocabulary {args.vocabulary}"] if args.vocabulary else [])
            + [f"--regularizer {shlex.quote(r)}" for r in args.regularizer]
            + ([f"--nearest {args.nearest} --nearest-pool {args.nearest_pool} --nearest-by {args.nearest_by}"]
               if args.nearest else [])
            + (["--keep-parts"] if args.keep_parts else [])
            + ([f"--nearest-as {args.nearest_as}"] if args.nearest or args.keep_parts else [])
            + ([f"--hold-out {args.hold_out}"] if args.hold_out else [])
            + [f"--eval-seeds {args.eval_seeds}", f"--requests {args.requests}"]),
        "domain": domain, "stream": stream, "keep": keep, "scored": {"style": scored_styles, "object": scored_objects},
        "honesty": honesty,
        "options": {k: (describe(v) if k in ("vocabulary", "regularizers") else v) for k, v in options.items()},
        "nearest": preserve_nearest or None,
        "base": rows[0], "rows": rows, "requests": records,
        "ratios": {"ira": _ratio(final.get("ira"), base_final.ira), "cra": _ratio(final.get("cra"), base_final.cra),
                   "kept_in_removed": _ratio(final.get("cross_removed"), base_removed)},
        "base_on_final_sets": {"ira": base_final.ira, "cra": base_final.cra},
        "base_kept_in_removed": base_removed,
        "max_request_seconds": round(max(request_seconds), 2),
    }
    print(json.dumps({k: summary[k] for k in ("ratios", "max_request_seconds")}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return 0


# -------------------------------------------------------------------------------------------- base images
def _base_path(folder: str, config: Any) -> Path:
    import hashlib

    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"base-{key}.pt"


def base_images(folder: str, config: Any) -> Any:
    """The base model's images of ``config`` stored by an earlier run (the model is the shipped one), or None."""
    import torch

    if not folder or not _base_path(folder, config).exists():
        return None
    return torch.load(_base_path(folder, config))


def store_base_images(folder: str, config: Any, images: Any) -> None:
    import torch

    path = _base_path(folder, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(images.detach().cpu(), path)


# ------------------------------------------------------------------------------------------- protection sets
def protection_set(spec: str) -> dict[str, list[str]]:
    """``{domain: [concepts]}`` for a SPEC (see the module docstring)."""
    from diffusers_unlearn.generic_vocabulary import generic_prompts, generic_vocabulary
    from diffusers_unlearn.vocabulary import DEFAULT_VOCABULARY

    merged: dict[str, list[str]] = {}
    for part in spec.split("+"):
        name, _, size = part.partition(":")
        limit = int(size) if size else None
        if name == "default":
            chosen = {d: list(cs)[:limit] for d, cs in DEFAULT_VOCABULARY.items()}
        elif name in ("generic", "generic-style", "generic-object"):
            chosen = {d: list(cs) for d, cs in generic_vocabulary(limit).items()
                      if name == "generic" or name == f"generic-{d}"}
        elif name == "prompts":
            chosen = {"concept": list(generic_prompts(limit))}
        else:
            raise SystemExit(f"unknown protection set {name!r} in {spec!r}")
        for domain, concepts in chosen.items():
            merged[domain] = list(dict.fromkeys([*merged.get(domain, []), *concepts]))
    return merged


def contains(phrase: str, concept: str) -> bool:
    """``concept`` occurs in ``phrase`` as whole words (case and spacing ignored)."""
    phrase, concept = " ".join(phrase.lower().split()), " ".join(concept.lower().split())
    return re.search(rf"(?<![\w-]){re.escape(concept)}(?![\w-])", phrase) is not None


def is_protected(concept: str, phrases: Sequence[str]) -> bool:
    return any(contains(p, concept) for p in phrases)


def protected_phrases(request: Any) -> Iterable[str]:
    """Every concept a built ``du.UnlearnRequest`` may protect: the closed form's vocabulary (the built-in one when
    none is given) and keep list, a trained method's keep list (retain loss), gradient projection's retain list and its
    whole neighbour pool (any of it may be chosen)."""
    from diffusers_unlearn.regularizers import GradientProjection
    from diffusers_unlearn.vocabulary import DEFAULT_VOCABULARY

    config = request.method
    yield from getattr(config, "keep", ())
    if hasattr(config, "vocabulary"):
        yield from flatten(DEFAULT_VOCABULARY if config.vocabulary is None else config.vocabulary)
    for regularizer in request.regularizers:
        if isinstance(regularizer, GradientProjection):
            yield from regularizer.retain
            if regularizer.neighbors:
                yield from flatten(DEFAULT_VOCABULARY if regularizer.vocabulary is None else regularizer.vocabulary)


def flatten(vocabulary: Mapping[str, Sequence[str]] | Sequence[str]) -> list[str]:
    if isinstance(vocabulary, Mapping):
        return [c for concepts in vocabulary.values() for c in concepts]
    return list(vocabulary)


def fill(scored: Sequence[str], refused: Sequence[str], spare: Sequence[str], protected: Sequence[str],
         named: Sequence[str]) -> tuple[list[str], list[str]]:
    """``scored`` without the refused concepts, topped up from ``spare`` with unprotected, unnamed concepts to the
    same count where there are enough; with the substitutes."""
    kept = [c for c in scored if c not in refused]
    substitutes = [c for c in spare if c not in named and not is_protected(c, protected)][: len(refused)]
    return kept + substitutes, substitutes


def nearest(pipe: Any, concept: str, domain: str, pool: Mapping[str, Sequence[str]], count: int,
            taken: Sequence[str], lexical: bool = False) -> list[str]:
    """The ``count`` concepts of ``pool`` nearest to ``concept``, none of ``taken`` (the concept and the earlier
    removals) or containing one of them: by the cosine of their embeddings, or (``lexical``) those sharing the most
    words with ``concept`` first, each group by cosine."""
    import torch

    from diffusers_unlearn.embeddings import concept_embedding, concept_embeddings

    candidates = [(c, d) for d, cs in pool.items() for c in cs
                  if not any(contains(c, t) for t in taken)]
    target = concept_embedding(pipe, concept, domain)
    vectors = concept_embeddings(pipe, candidates)
    sims = torch.nn.functional.cosine_similarity(vectors, target[:, None], dim=0)
    words = set(concept.lower().split())
    shared = [len(words & set(c.lower().split())) if lexical else 0 for c, _ in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (-shared[i], -float(sims[i])))[:count]
    return [candidates[i][0] for i in order]


def request_report(record: Any) -> dict[str, Any]:
    """The method's and gradient projection's reports of one ledger record, without their long concept lists."""
    out: dict[str, Any] = {}
    for key, value in (getattr(record, "report", None) or {}).items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
    for regularizer in getattr(record, "regularizers", None) or []:
        report = regularizer.get("report") or {}
        out[regularizer.get("name", "regularizer")] = {k: v for k, v in report.items()
                                                      if isinstance(v, (int, float, str, bool))}
    return out


def describe(value: Any) -> Any:
    """A JSON-able summary of a vocabulary or regularizer list (sizes, not the thousands of phrases)."""
    if isinstance(value, Mapping):
        return {d: len(cs) for d, cs in value.items()}
    if isinstance(value, list):
        return [{k: (describe(v) if k == "vocabulary" and v is not None else v) for k, v in r.to_dict().items()}
                for r in value]
    return value


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round(value / base, 3)


if __name__ == "__main__":
    raise SystemExit(main())
