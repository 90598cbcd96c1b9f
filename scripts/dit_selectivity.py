"""How selectively a request moves the tiny SD3 / Flux velocity, over seeds: the sweep behind the table in
docs/deploy.md ("ESD selectivity") and the closed form's figures there.

    python scripts/dit_selectivity.py [--family sd3,flux] [--seeds 0-7] [--method esd|closed_form]

For each family and seed: builds the tiny pipeline of that seed, teaches it the world of ``tests/dit_world.py``
(each concept its own picture, teaching seed = the seed), removes "van gogh" with the settings of
``tests/test_sd3_flux.py`` (ESD: 6 steps, ``FAST``; closed form: ``CLOSED_FORM``), and prints the relative velocity
change of the target and the median and largest over the world's 10 unrelated prompts (``velocity_moves``). The
test asserts target > 2 x median at seed 0. About 25-40 s per family and seed on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import diffusers_unlearn as du  # noqa: E402
from dit_world import UNRELATED_PROMPTS, teach_concept_pictures, velocity_moves  # noqa: E402
from test_sd3_flux import CLOSED_FORM, FAMILIES, FAST  # noqa: E402


def seeds(text: str) -> list[int]:
    """"0-7" or "0,2,5"."""
    if "-" in text:
        low, high = (int(x) for x in text.split("-"))
        return list(range(low, high + 1))
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd3,flux", help="sd3, flux or both (default)")
    parser.add_argument("--seeds", default="0-3", help="e.g. 0-7 or 0,2,5 (default 0-3)")
    parser.add_argument("--method", default="esd", choices=["esd", "closed_form"])
    args = parser.parse_args()
    families = args.family.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown --family {unknown}; allowed: {sorted(FAMILIES)}")
    options = dict(FAST, seed=0) if args.method == "esd" else dict(CLOSED_FORM)
    print(f"method {args.method}; relative velocity change of 'a painting in van gogh style' and of "
          f"{len(UNRELATED_PROMPTS)} unrelated prompts")
    print("| family | seed | target | unrelated median | unrelated max | target / median |")
    print("|---|---|---|---|---|---|")
    for family in families:
        for seed in seeds(args.seeds):
            pipe = du.attach(teach_concept_pictures(FAMILIES[family][0](seed=seed), seed=seed))
            if args.method == "esd":
                options["seed"] = seed
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the erasure check's verdict is not what this measures
                pipe.unlearn("van gogh", domain="style", progress=False, **options)
            moved = velocity_moves(pipe, ["a painting in van gogh style", *UNRELATED_PROMPTS])
            target, median, largest = moved[0].item(), moved[1:].median().item(), moved[1:].max().item()
            print(f"| {family} | {seed} | {target:.3f} | {median:.3f} | {largest:.3f} | {target / median:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
