"""Merge the results.json of several ``diffusers-unlearn bench`` runs over the same world, stream and evaluation
(for example the trained protocols in one run and ``--protocols closed_form`` in another) into one report.

    python scripts/merge_bench_results.py OUT RESULTS_1.json RESULTS_2.json [...]

Refuses runs whose stream, evaluation set or base scores differ: their rows would not be comparable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffusers_unlearn.bench.report import write_report


def _without_timings(value: object) -> object:
    """The scores of a result part, without its wall times (two runs never take the same seconds)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if "seconds" not in k}
    return value


def merge(paths: list[str]) -> dict:
    results = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(results[0], protocols={}, commands=[])
    for path, result in zip(paths, results):
        for key in ("stream", "base", "world"):
            if _without_timings(result[key]) != _without_timings(merged[key]):
                raise ValueError(f"{path}: its {key!r} differs from {paths[0]}'s; the runs are not comparable")
        overlap = set(result["protocols"]) & set(merged["protocols"])
        if overlap:
            raise ValueError(f"{path}: protocols {sorted(overlap)} are in an earlier file too")
        merged["protocols"].update(result["protocols"])
        merged["commands"].append(result["command"])
    merged["seconds"] = sum(r.get("seconds", 0) for r in results)  # the runs' wall times, as if one after another
    merged["command"] = " && ".join(merged["commands"])
    merged["settings"] = dict(merged["settings"], protocols=list(merged["protocols"]))
    return merged


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, paths = argv[0], argv[1:]
    merged = merge(paths)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_report(merged, out)
    print(f"wrote {out}: {', '.join(merged['protocols'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
