"""Cost of one closed-form request at Stable Diffusion 1.5's and SDXL's K/V sizes, side by side with a plain UCE
solve of the same layers from the same inputs, on the CPU.

    python scripts/closed_form_sd15.py                          # SD 1.5 (768) and SDXL (2048), requests 1 and 12
    python scripts/closed_form_sd15.py --models sd15 --requests 1 12 36 --repeats 3 --threads 1

Each model gets randomly initialised CLIP text encoders at full width (SD 1.5: CLIP ViT-L, 768, last hidden state;
SDXL: CLIP ViT-L and OpenCLIP bigG, 768 + 1280 = 2048, penultimate hidden states concatenated), with
``--encoder-layers`` transformer layers each (default 2: the width, which sets the solve's cost, is full; the depth
only shapes the random states), and random K/V weights at full size (SD 1.5: 16 cross-attention blocks, to_k and
to_v 768 -> 320/640/1280, 32 layers; SDXL: 70 blocks, 2048 -> 640/1280, 140 layers). Random token ids stand for the
words: 4 templates, a concept of 1-3 tokens, padded to 77 tokens. What the solve reads is what
``unlearn(method="closed_form")`` builds with the default settings: the empty prompt's 77 token states and one
embedding per kept concept (``--kept`` concepts, default 70: the built-in vocabulary) held exactly, every token of
the kept concepts in every template kept softly (keep_weight 0.5), the new concept's and each earlier removal's
token pairs mapped onto the empty slot (negative guidance 1, weight 10 each, ridge 1e-4). Request k keeps k - 1
earlier removals mapped and starts from weights that earlier requests moved.

Side by side, on the same inputs and the same layers:

* library: ``Solver.build`` then ``layer_change`` for every layer (the change in its stored form, float32), what
  ``solve`` does after encoding the prompts;
* reference: the textbook one-shot UCE closed form, W' = (sum w W c_anchor c_e^T + lambda_p sum W c_p c_p^T +
  lambda W) (sum w c_e c_e^T + lambda_p sum c_p c_p^T + lambda I)^-1 with W the current weight, c_e / c_anchor the
  same token pairs and weights, c_p the same kept tokens and kept embeddings with lambda_p = keep_weight, and
  lambda the same relative ridge; the d x d system in float64 (solved by Cholesky), then one float32 product
  W (R - I) per layer, the dense change.

The text encoders' forward passes are not timed (both solves read the same states). Prints one Markdown row per
(model, request): seconds of each (best of ``--repeats``, the three interleaved), the library's share spent before
the layers (build), the library again with the kept tokens' Gram given (what a stream's later requests do: ``solve``
caches it on the pipeline), the ratios library / reference, and the bytes each stores.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from diffusers_unlearn.objectives.closed_form import Solver

TOKENS, BOS, EOS, VOCAB = 77, 49406, 49407, 49408
SD15_KV_OUT = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]  # 16 blocks
SDXL_KV_OUT = [640] * 4 + [1280] * 20 + [1280] * 10 + [1280] * 30 + [640] * 6  # 70 blocks, down / mid / up
# (hidden, intermediate, heads, full depth) of each text encoder, and which hidden state the UNet reads
MODELS = {
    "sd15": dict(label="SD 1.5", encoders=[(768, 3072, 12, 12)], penultimate=False, kv_out=SD15_KV_OUT),
    "sdxl": dict(label="SDXL", encoders=[(768, 3072, 12, 12), (1280, 5120, 20, 32)], penultimate=True,
                 kv_out=SDXL_KV_OUT),
}
CONCEPT_WEIGHT = EARLIER_WEIGHT = 10.0  # ClosedFormConfig's defaults
KEEP_WEIGHT, NEGATIVE_GUIDANCE, RIDGE = 0.5, 1.0, 1e-4
Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # (keys [n, d], targets [n, d]) per mapped concept
Weights = dict[str, torch.Tensor]  # layer name -> [out, d]


class RandomText:
    """Randomly initialised CLIP text encoders at full width; ``states`` gives the K/V layers' input per token."""

    def __init__(self, model: str, layers: int, seed: int = 0):
        spec = MODELS[model]
        torch.manual_seed(seed)
        self.encoders = []
        for hidden, inner, heads, depth in spec["encoders"]:
            config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inner,
                                    num_attention_heads=heads, num_hidden_layers=min(layers, depth),
                                    max_position_embeddings=TOKENS, projection_dim=hidden)
            self.encoders.append(CLIPTextModel(config).eval())
        self.penultimate = spec["penultimate"]
        self.width = sum(e[0] for e in spec["encoders"])

    @torch.no_grad()
    def states(self, rows: list[list[int]], batch: int = 32) -> torch.Tensor:
        """[n, 77, width] float64 token states of the padded id rows."""
        out = []
        for start in range(0, len(rows), batch):
            ids = torch.tensor([r + [EOS] * (TOKENS - len(r)) for r in rows[start:start + batch]])
            parts = []
            for encoder in self.encoders:
                result = encoder(ids, output_hidden_states=self.penultimate)
                parts.append(result.hidden_states[-2] if self.penultimate else result.last_hidden_state)
            out.append(torch.cat(parts, dim=-1).double())
        return torch.cat(out)


@dataclass
class World:
    """Random words: ``templates`` (prefix ids, suffix ids) and concepts (1-3 ids each)."""

    templates: list[tuple[list[int], list[int]]]
    concepts: list[list[int]]

    @classmethod
    def make(cls, concepts: int, seed: int = 0) -> World:
        """4 templates and ``concepts`` concepts of random ids."""
        gen = torch.Generator().manual_seed(seed)

        def words(n: int) -> list[int]:
            return torch.randint(1000, 40000, (n,), generator=gen).tolist()

        templates = [(words(4 + i % 3), words(1 + i % 2)) for i in range(4)]
        sizes = torch.randint(1, 4, (concepts,), generator=gen).tolist()
        return cls(templates, [words(n) for n in sizes])

    def prompt(self, t: int, concept: list[int]) -> list[int]:
        """Template ``t``'s ids with ``concept`` in its slot (empty: the anchor ""), unpadded."""
        prefix, suffix = self.templates[t]
        return [BOS, *prefix, *concept, *suffix, EOS]


def mapping_pairs(text: RandomText, world: World, concept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [n, d], targets [n, d]) of ``concept`` -> the empty slot, as ``keys.mapping_keys`` pairs them: the
    concept's last token and every one after it with the token before the slot and every one after it, the
    concept's earlier tokens with the token before the slot; targets a + g (a - c)."""
    count = len(world.templates)
    hidden = text.states([world.prompt(t, concept) for t in range(count)] + [world.prompt(t, []) for t in range(count)])
    keys, anchors = [], []
    for t in range(count):
        start = 1 + len(world.templates[t][0])
        first, a_first = start + len(concept) - 1, start - 1
        length = TOKENS - first
        keys.append(hidden[t, first:first + length])
        anchors.append(hidden[count + t, a_first:a_first + length])
        if first > start:
            keys.append(hidden[t, start:first])
            anchors.append(hidden[count + t, a_first:a_first + 1].expand(first - start, -1))
    keys, anchors = torch.cat(keys), torch.cat(anchors)
    return keys, anchors + NEGATIVE_GUIDANCE * (anchors - keys)


def kept_states(text: RandomText, world: World, kept: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [d, 77 + kept]: the empty prompt's tokens and each kept concept's embedding, kept tokens [m, d])."""
    count = len(world.templates)
    hidden = text.states([[BOS, EOS]] + [world.prompt(t, c) for c in kept for t in range(count)])
    columns, tokens = [hidden[0]], []
    for i, concept in enumerate(kept):
        means = []
        for t in range(count):
            start = 1 + len(world.templates[t][0])
            row = hidden[1 + i * count + t]
            tokens.append(row[start:])
            means.append(row[start:start + len(concept)].mean(dim=0))
        columns.append(torch.stack(means).mean(dim=0, keepdim=True))
    return torch.cat(columns).T.contiguous(), torch.cat(tokens)


def kv_weights(kv_out: list[int], width: int, seed: int = 0) -> Weights:
    """Random K/V weights [out, width] per layer, with CLIP-like input scale."""
    gen = torch.Generator().manual_seed(seed)
    return {f"block{i}.attn2.{kv}": torch.randn(out, width, generator=gen) * width ** -0.5
            for i, out in enumerate(kv_out) for kv in ("to_k", "to_v")}


def library_request(protected: torch.Tensor, mappings: Pairs, keep: torch.Tensor, base: Weights, offsets: Weights,
                    keep_gram: torch.Tensor | None = None) -> tuple[float, float, int, int]:
    """The library's request: (seconds, seconds before the layers, stored bytes, layers stored as factors). With
    ``keep_gram`` the kept tokens' Gram is the one an earlier request of the stream cached (``kept_gram``)."""
    started = time.perf_counter()
    weights = [CONCEPT_WEIGHT] + [EARLIER_WEIGHT] * (len(mappings) - 1)
    solver = Solver.build(protected, mappings, RIDGE, weights, None if keep_gram is not None else keep, KEEP_WEIGHT,
                          keep_gram=keep_gram).to(torch.float32)
    built = time.perf_counter() - started
    stored, factored = 0, 0
    for name, w in base.items():
        change = solver.layer_change(w, offsets.get(name))
        factored += isinstance(change, tuple)
        stored += 4 * sum(t.numel() for t in (change if isinstance(change, tuple) else (change,)))
    return time.perf_counter() - started, built, stored, factored


def reference_uce(protected: torch.Tensor, mappings: Pairs, keep: torch.Tensor, base: Weights, offsets: Weights
                  ) -> tuple[float, int]:
    """The textbook one-shot UCE solve of the same layers: (seconds, stored bytes of the dense changes)."""
    started = time.perf_counter()
    weights = [CONCEPT_WEIGHT] + [EARLIER_WEIGHT] * (len(mappings) - 1)
    roots = [w ** 0.5 for w in weights]
    keys = torch.cat([r * k for r, (k, _) in zip(roots, mappings)])
    anchors = torch.cat([r * a for r, (_, a) in zip(roots, mappings)])
    d = keys.shape[1]
    kept = KEEP_WEIGHT * (keep.T @ keep + protected @ protected.T)
    covariance = keys.T @ keys
    lam = RIDGE * float(torch.trace(covariance)) / d
    eye = torch.eye(d, dtype=torch.float64)
    system = covariance + kept + lam * eye
    numerator = anchors.T @ keys + kept + lam * eye  # W' = W numerator system^-1
    factor = torch.linalg.cholesky(system)
    shift = (torch.cholesky_solve(numerator.T.contiguous(), factor).T - eye).float().contiguous()  # R - I
    stored = 0
    for name, w in base.items():
        current = w if name not in offsets else w + offsets[name]
        stored += 4 * (current @ shift).numel()  # the change W' - W = W (R - I)
    return time.perf_counter() - started, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["sd15", "sdxl"])
    parser.add_argument("--requests", nargs="+", type=int, default=[1, 12, 36],
                        help="request indices k (default 1 12 36)")
    parser.add_argument("--kept", type=int, default=70, help="kept concepts (default 70, the built-in vocabulary)")
    parser.add_argument("--encoder-layers", type=int, default=2, help="layers of each random text encoder")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores), {args.threads} thread(s)")
    print("| model | text width | K/V layers | request | kept states (P columns, kept tokens) | mapped pairs | "
          "library s (build) | library s, kept Gram cached (build) | reference UCE s | library / reference "
          "(cached) | library MB (factor layers) | reference MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        spec = MODELS[model]
        text = RandomText(model, args.encoder_layers)
        world = World.make(args.kept + max(args.requests))
        protected, keep = kept_states(text, world, world.concepts[:args.kept])
        keep_gram = keep.T @ keep
        removals = world.concepts[args.kept:]
        pairs = [mapping_pairs(text, world, c) for c in removals[:max(args.requests)]]
        base = kv_weights(spec["kv_out"], text.width)
        for k in args.requests:
            gen = torch.Generator().manual_seed(k)
            # what k - 1 earlier requests moved: 1e-2 of the weights' scale (0 for request 1)
            offsets = {} if k == 1 else {n: 1e-2 * w.std() * torch.randn(w.shape, generator=gen)
                                         for n, w in base.items()}
            mappings = [pairs[k - 1], *pairs[:k - 1]]  # the new concept first, then the earlier removals
            cold, warm, ref = [], [], []
            for _ in range(args.repeats):  # interleaved, so that a change of load hits all three alike
                cold.append(library_request(protected, mappings, keep, base, offsets))
                warm.append(library_request(protected, mappings, keep, base, offsets, keep_gram))
                ref.append(reference_uce(protected, mappings, keep, base, offsets))
            cold, warm = min(cold, key=lambda r: r[0]), min(warm, key=lambda r: r[0])
            best_ref = min(ref, key=lambda r: r[0])
            n_pairs = sum(len(m[0]) for m in mappings)
            print(f"| {spec['label']} | {text.width} | {len(base)} | {k} | {protected.shape[1]}, {len(keep)} | "
                  f"{n_pairs} | {cold[0]:.2f} ({cold[1]:.2f}) | {warm[0]:.2f} ({warm[1]:.2f}) | {best_ref[0]:.2f} | "
                  f"{cold[0] / best_ref[0]:.2f} ({warm[0] / best_ref[0]:.2f}) | {cold[2] / 1e6:.1f} ({cold[3]}) | "
                  f"{best_ref[1] / 1e6:.1f} |", flush=True)
            del offsets
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
