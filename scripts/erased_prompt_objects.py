"""Does an erased style's prompt still draw its object? One closed-form style request on the shipped MiniCanvas,
under each variant of its method settings, from a fresh pipeline each time.

    python scripts/erased_prompt_objects.py --style "pastel waves" \
        --variants '{"base": null, "guidance 1": {"negative_guidance": 1.0}, "guidance 0": {"negative_guidance": 0.0}}'

For each variant: ``pipe.unlearn(style, domain="minicanvas-style", **variant)`` (``null``: the base model, no request),
then "a {object} in {style} style" for the first ``--objects`` MiniCanvas objects (seed 1000 + i, 10 DDIM steps),
scored by the shipped classifiers: the style classifier's accuracy on the removed style's own prompts (0: erased),
the object classifier's accuracy on them (the object kept in the erased prompt), and both on a few kept styles'
prompts (``--kept``). Prints one JSON line per variant. One thread; a single request and 8 images per style, so
one image is 12.5 points.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", default="pastel waves", help="the MiniCanvas style to remove")
    parser.add_argument("--variants", required=True,
                        help='JSON: name -> the request\'s method settings (null: the base model)')
    parser.add_argument("--objects", type=int, default=8, help="the first N MiniCanvas objects (default 8)")
    parser.add_argument("--kept", default="pastel dots,neon waves,ink sketch",
                        help="comma-separated kept styles also scored")
    args = parser.parse_args()
    variants = json.loads(args.variants)

    import torch

    import diffusers_unlearn as du
    from diffusers_unlearn import minicanvas as mc

    torch.set_num_threads(1)
    objects = list(mc.OBJECTS)[: args.objects]
    style_classifier, object_classifier = mc.load_classifiers()

    def score(pipe, style: str) -> tuple[float, float]:
        prompts = [mc.prompt(style, o) for o in objects]
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=10, guidance_scale=mc.GUIDANCE_SCALE, generator=generators).images
        styles, drawn = style_classifier(images), object_classifier(images)
        return (100.0 * sum(s == style for s in styles) / len(objects),
                100.0 * sum(d == o for d, o in zip(drawn, objects)) / len(objects))

    kept = [k.strip() for k in args.kept.split(",") if k.strip()]
    for name, options in variants.items():
        pipe = du.attach(mc.load_pipeline())
        pipe.set_progress_bar_config(disable=True)
        if options is not None:
            pipe.unlearn(args.style, domain="minicanvas-style", progress=False, **options)
        style_accuracy, objects_kept = score(pipe, args.style)
        kept_scores = [score(pipe, k) for k in kept]
        print(json.dumps({"variant": name, "style": args.style, "style_accuracy_on_removed": style_accuracy,
                          "objects_kept_in_removed": objects_kept, "kept_styles": kept,
                          "kept_style_accuracy": [s for s, _ in kept_scores],
                          "kept_object_accuracy": [o for _, o in kept_scores]}), flush=True)


if __name__ == "__main__":
    main()
