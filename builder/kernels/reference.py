"""Reference expert dispatch: a plain loop over experts, the ground truth for every backend.

Follows transformers' `MixtralExperts.forward` (transformers 5.x): for each expert that has
tokens, gather them, run the expert MLP, weight by the gate and add into the output. Weights are
split with `.unbind(0)` once per call rather than indexed per expert: indexing a stacked
parameter makes every expert's backward allocate a full-size zero gradient
(shared/reference/cpu-dispatch-notes.md, finding 1).

Every backend has this signature: `fn(x_TD, weights_TK, ids_TK, pool) -> y_TD`, where
`ids_TK == -1` marks a dropped slot (contributes nothing, costs nothing) and `pool` provides
`split() -> list[ExpertWeights]` and `mlp(x_ND, expert_weights) -> y_ND`.

Legend: T tokens, D hidden, K top-k slots per token, E experts, N rows routed to one expert,
I expert intermediate size.
"""

from typing import NamedTuple

import torch
from torch import Tensor


class ExpertWeights(NamedTuple):
    """One expert's tensors as 2-D views of the pool's stacked parameters."""

    w_in: Tensor  # [2I, D] (gate rows then up rows) when gated, else [I, D]
    b_in: Tensor | None
    w_out: Tensor  # [D, I]
    b_out: Tensor | None


def eager_dispatch(x_TD: Tensor, weights_TK: Tensor, ids_TK: Tensor, pool) -> Tensor:
    y_TD = torch.zeros_like(x_TD)
    for e, expert in enumerate(pool.split()):
        token_idx, slot_idx = torch.where(ids_TK == e)
        if token_idx.numel() == 0:
            continue
        y_ND = pool.mlp(x_TD[token_idx], expert)
        gate_N1 = weights_TK[token_idx, slot_idx, None].to(y_ND.dtype)
        y_TD = y_TD.index_add(0, token_idx, y_ND * gate_N1)
    return y_TD
