"""24 MiniCanvas styles removed by ONE closed-form request against the same 24 as 24 single requests in one stream.

    python scripts/multi_concept.py [--eval-seeds 1] [--eval-steps 10] [--threads 2] [--out docs/bench/multi-concept]

The removed styles are the first two of each of MiniCanvas's 12 families (``minicanvas.STYLE_FAMILIES``). Both runs
serve them through the bench's own request (``bench.runner.request_kwargs``, protocol ``closed_form``: the
library's recommended closed form with the world's protection set) on a fresh pipeline each:

* one request: ``pipe.unlearn([24 styles], ...)``, one ledger entry, one joint solve;
* a stream: 24 ``pipe.unlearn(style, ...)`` calls, one after another.

Scored with the bench's honest split (``bench.streams.stream_world``): the other 24 styles and 6 objects are
scored and never protected; what the solve keeps is MiniCanvas's auxiliary vocabulary less every scored or removed
concept (its family x texture pairs that are not styles, and the generic words), plus the three objects the style
prompts are written with (car, flower, mushroom), which are kept and never scored. UA: 100 - accuracy on the 24
removed styles' images; IRA: accuracy on the 24 kept styles' images; CRA: object accuracy on the kept styles'
images (``bench.mixed.score_stream``). Prints the two side by side with the wall time of each request (the solve
alone and the whole ``unlearn`` call with its erasure check) and writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, not an installed one
import diffusers_unlearn as du  # noqa: E402
from diffusers_unlearn import minicanvas as mc  # noqa: E402
from diffusers_unlearn.bench.mixed import evaluate_stream  # noqa: E402
from diffusers_unlearn.bench.protocols import resolve_protocols  # noqa: E402
from diffusers_unlearn.bench.runner import BenchSettings, request_kwargs  # noqa: E402
from diffusers_unlearn.bench.streams import Stream, stream_world  # noqa: E402
from diffusers_unlearn.bench.world import minicanvas_world  # noqa: E402
from diffusers_unlearn.evaluation import kv_drift  # noqa: E402

REMOVED = tuple(s for styles in mc.STYLE_FAMILIES.values() for s in styles[:2])
KEPT_STYLES = tuple(s for styles in mc.STYLE_FAMILIES.values() for s in styles[2:])
PROMPT_OBJECTS = ("car", "flower", "mushroom")  # the style requests' prompts draw them: kept, never scored
KEPT_OBJECTS = ("bear", "cat", "fish", "house", "tree", "boat")
SCORES = ("ua", "ira", "cra", "cross_removed", "image_change")


def _stream() -> Stream:
    pairs = tuple(c for c in mc.auxiliary_concepts()["style"] if c not in mc.STYLES and len(c.split()) == 2)
    return Stream("multi24", "24 MiniCanvas styles (two per family) removed", tuple(("style", s) for s in REMOVED),
                  {"style": KEPT_STYLES, "object": KEPT_OBJECTS}, {"object": PROMPT_OBJECTS},
                  {"style": pairs, "object": PROMPT_OBJECTS})


def _scores(world, stream, pipe, progress: bool) -> dict:
    scores = evaluate_stream(world, stream, pipe, [("style", s) for s in REMOVED], progress)
    out = {k: scores.get(k) for k in SCORES}
    out["accuracy"] = scores.get("accuracy")
    out["eval_seconds"] = scores.get("eval_seconds")
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    stream = _stream()
    world = stream_world(minicanvas_world(eval_seeds=args.eval_seeds, eval_steps=args.eval_steps, heldout=False),
                         stream, auxiliary=mc.auxiliary_concepts())
    world.register_domains()
    protocol = resolve_protocols(["closed_form"])[0]
    settings = BenchSettings(requests=1, domain="style", protocols=[protocol.name], seed=0)
    progress = not args.quiet

    def fresh():
        pipe = du.attach(world.load_pipeline())
        pipe.set_progress_bar_config(disable=not progress)
        return pipe

    # one request of all 24
    pipe = fresh()
    kwargs = request_kwargs(world, settings, protocol, list(REMOVED))
    started = time.perf_counter()
    record = pipe.unlearn(**kwargs, seed=0, progress=progress)
    one_wall = time.perf_counter() - started
    report = record.regularizers[0]["report"]
    one = {"requests": 1, "ledger_entries": len(pipe.unlearning_ledger.requests), "solve_seconds": record.seconds,
           "unlearn_seconds": round(one_wall, 3), "probe_prompts": len(record.erasure.get("probe", {}).get("prompts", []))
           * len(REMOVED), "erased": record.erasure.get("erased"),
           "not_erased": [c for c, f in record.erasure.get("concepts", {}).items() if not f.get("erased", True)],
           "drift": kv_drift(pipe), "protected_rank": report.get("protected_rank"),
           "solve_rank": report.get("solve_rank"), "mapped_concepts": report.get("mapped_concepts")}
    print(f"one request of {len(REMOVED)} styles: solve {record.seconds:.2f} s, unlearn() {one_wall:.2f} s",
          flush=True)
    one.update(_scores(world, stream, pipe, progress))
    protected = {"style": list(kwargs["method"].vocabulary.get(world.prompt_domain("style"), [])),
                 "object": list(kwargs["method"].vocabulary.get(world.prompt_domain("object"), []))}
    del pipe

    # the same 24, one request each
    pipe = fresh()
    solve = wall = 0.0
    per_request = []
    for k, style in enumerate(REMOVED):
        kwargs = request_kwargs(world, settings, protocol, style, list(REMOVED[:k]))
        started = time.perf_counter()
        record = pipe.unlearn(**kwargs, seed=k, progress=progress)
        elapsed = time.perf_counter() - started
        solve, wall = solve + record.seconds, wall + elapsed
        per_request.append({"concept": style, "solve_seconds": record.seconds, "unlearn_seconds": round(elapsed, 3),
                            "erased": record.erasure.get("erased")})
    print(f"{len(REMOVED)} single requests: solves {solve:.2f} s, unlearn() {wall:.2f} s", flush=True)
    stream_result = {"requests": len(REMOVED), "ledger_entries": len(pipe.unlearning_ledger.requests),
                     "solve_seconds": round(solve, 3), "unlearn_seconds": round(wall, 3),
                     "last_solve_seconds": per_request[-1]["solve_seconds"],
                     "not_erased": [r["concept"] for r in per_request if not r["erased"]],
                     "drift": kv_drift(pipe), "per_request": per_request}
    stream_result.update(_scores(world, stream, pipe, progress))
    del pipe

    base = _scores(world, stream, fresh(), progress)
    return {
        "command": "python scripts/multi_concept.py " + " ".join(sys.argv[1:]),
        "removed": list(REMOVED), "scored": {"style": list(KEPT_STYLES), "object": list(KEPT_OBJECTS)},
        "protected": protected, "prompt_objects": list(PROMPT_OBJECTS),
        "eval": {"seeds": args.eval_seeds, "steps": args.eval_steps, "images_per_evaluation":
                 len(world.eval_config.cases())},
        "base": base, "one_request": one, "stream": stream_result,
        "environment": {"threads": args.threads, "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "diffusers_unlearn": du.__version__},
    }


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown(result: dict) -> str:
    one, stream, base = result["one_request"], result["stream"], result["base"]
    rows = [("requests (ledger entries)", "-", f"{one['ledger_entries']}", f"{stream['ledger_entries']}"),
            ("solve seconds (all requests)", "-", f"{one['solve_seconds']:.2f}", f"{stream['solve_seconds']:.2f}"),
            ("unlearn() seconds, erasure checks included", "-", f"{one['unlearn_seconds']:.2f}",
             f"{stream['unlearn_seconds']:.2f}"),
            ("UA (24 removed styles)", _pct(base["ua"]), _pct(one["ua"]), _pct(stream["ua"])),
            ("IRA (24 kept styles)", _pct(base["ira"]), _pct(one["ira"]), _pct(stream["ira"])),
            ("CRA (6 kept objects)", _pct(base["cra"]), _pct(one["cra"]), _pct(stream["cra"])),
            ("objects kept in removed-style prompts", _pct(base["cross_removed"]), _pct(one["cross_removed"]),
             _pct(stream["cross_removed"])),
            ("K/V drift", "0", f"{one['drift']:.4g}", f"{stream['drift']:.4g}"),
            ("concepts the erasure check calls not erased", "-", str(len(one["not_erased"])),
             str(len(stream["not_erased"])))]
    lines = ["| | base | one request of 24 | 24 requests in a stream |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-seeds", type=int, default=1)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
