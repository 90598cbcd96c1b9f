"""Closed-form, ledger-aware erasure (``method="closed_form"``): the smallest K/V change that maps a concept onto
an anchor (UCE-style), solved, not trained.

For every cross-attention K/V weight, with W0 the base weight and W the current one (earlier requests folded in),
the request's change D solves, in float64 and with no training loop (``solver.py``):

1. protected set P (``keys.protected_columns``: the kept concepts' embeddings and the empty prompt's tokens, all of
   them on UNets, the start and end tokens on SD3 / Flux, whose hundreds of padding tokens would fill the space):
   (W + D) p = W0 p, exactly on span(P): D lives in the complement of span(P), apart from the correction that brings
   P back to its base outputs;
2. inside that complement, least squares with a small ridge over token pairs (c, a) (``keys.mapping_keys``): the
   new concept's tokens c map to the anchor's outputs W0 a, and so does every concept removed earlier (read from
   the ledger, each with its own anchor), so that a later request cannot undo an earlier one;
3. optionally (``siblings=``, on in the recommended settings) a soft penalty on sibling states
   (``siblings.sibling_tokens``): every mapped concept's prompts with one of its words replaced by random token
   embeddings, so that the edit moves the concept's own combination of words, not each word's other company.

When the concept's embedding lies almost inside span(P) only its residual outside the span can carry the erasure;
the solve still maps it (a larger edit), and the report records the share of the target inside the span
(``target_in_span``; figures in docs/benchmarks/closed-form.md).

The result is stored exactly, each layer in whichever form holds fewer numbers: LoRA factors D = B @ A or the dense
delta (``Solver.layer_change``), so the ledger, audit, fold, merge and LoRA export treat it like any trained request.
When the protected states and the removals kept mapped fill the K/V input (``Solver.occupancy``), the solve warns
with a ``CapacityWarning`` that names what frees room. Each request is solved on top of, and keeping, the ones before it, so rolling one back
re-solves the closed-form requests after it (``ClosedFormObjective.after_rollback``, called by the engine).

SD3 and Flux: only the first joint block is solved. UCE assumes each K/V layer reads token states fixed by the
prompt. A UNet's cross-attention meets it at every block and timestep. In a joint transformer the first block's
``add_k_proj`` / ``add_v_proj`` read the context embedder's output modulated by the timestep and the pooled text (no
image enters, but it depends on t); every later block reads a text stream that has attended to the image and to the
earlier blocks' K/V, which this very edit changes. The solve therefore reads the first block's states
(``text_states.PromptStates``) at each timestep the pipeline's sampler visits in ``sampling_steps`` steps (Flux
shifts its schedule by ``resolution`` too), and stores zero changes for the later blocks' layers
(``ModelFamily.prompt_only_layers``). Its invariants are exact at those timesteps: solve with ``sampling_steps``
equal to the deployment's ``num_inference_steps`` and they hold at every step of every generation. Kept concepts
take one column per tokenizer segment (SD3: CLIP, then T5) and timestep, so keep the vocabulary well below
width / (segments x steps) kept concepts; the solve warns when nothing is left to edit.
"""

from ..base import register_objective
from .config import PROTECTIONS, ClosedFormConfig
from .keys import (EarlierRequest, concept_states, concept_tokens, default_states, earlier_requests, mapping_keys,
                   protected_columns)
from .objective import ClosedFormObjective
from .siblings import draw_embeddings, sibling_tokens, table_statistics
from .solver import (CAPACITY_FRACTION, KEY_RTOL, SPAN_RTOL, CapacityWarning, Solver, adversarial_map, cap_kept_span,
                     check_capacity, compact_factors, edited_layers, recovery, solve)

register_objective(ClosedFormConfig, ClosedFormObjective)

__all__ = [
    "CAPACITY_FRACTION",
    "CapacityWarning",
    "KEY_RTOL",
    "PROTECTIONS",
    "SPAN_RTOL",
    "ClosedFormConfig",
    "ClosedFormObjective",
    "EarlierRequest",
    "Solver",
    "adversarial_map",
    "cap_kept_span",
    "check_capacity",
    "compact_factors",
    "concept_states",
    "concept_tokens",
    "default_states",
    "edited_layers",
    "earlier_requests",
    "mapping_keys",
    "protected_columns",
    "recovery",
    "sibling_tokens",
    "solve",
    "draw_embeddings",
    "table_statistics",
]
