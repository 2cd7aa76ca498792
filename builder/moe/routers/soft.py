"""Soft MoE (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts").

Each expert has `slots_per_expert` slots; a slot's input is a convex mix of tokens and a token's
output a convex mix of slot outputs. With logits L = x Phi [T, S] (Phi: `weight` [S, D], S = E *
slots_per_expert): dispatch = softmax of L over tokens (per slot), combine = softmax of L over
slots (per token); slot inputs = dispatch^T x, outputs y = combine * expert(slot inputs).
(The paper's l2-normalisation of x and Phi is left out.)

Causality: slots mix tokens, so here they mix only the tokens of one sequence in this call,
padding excluded. A token's output then depends on later tokens of the sequence, and a
KV-cache decoding step (one new token, which fills every slot alone) differs from the full
forward. Soft MoE is an encoder method; use it where that is acceptable.
No token is dropped and load is fixed by construction, so balancing terms skip this router.
Statistics see each token as using every expert, weighted by its combine mass per expert.

Legend: T tokens, B sequences, D hidden, E experts, S slots (all experts), P slots per expert.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from moebuild.moe.batch import RouteBatch
from moebuild.moe.routers.base import DTYPES, LinearRouter, Routing


def _softmax_over_tokens(logits_TS: Tensor, valid_T: Tensor, seq_T: Tensor, num_seqs: int) -> Tensor:
    """Softmax over the non-padding tokens of each sequence, per slot."""
    B, S = num_seqs, logits_TS.shape[1]
    masked_TS = logits_TS.masked_fill(~valid_T[:, None], float("-inf"))
    index_TS = seq_T[:, None].expand_as(masked_TS)
    max_BS = torch.full((B, S), float("-inf"), device=logits_TS.device).scatter_reduce(0, index_TS, masked_TS.detach(), "amax")
    exp_TS = (masked_TS - max_BS[seq_T].clamp_min(-1e30)).exp()  # padding: exp(-inf) = 0
    sum_BS = torch.zeros(B, S, device=logits_TS.device).index_add(0, seq_T, exp_TS)
    return exp_TS / sum_BS[seq_T].clamp_min(1e-30)


@dataclass
class SoftRouting(Routing):
    """The pool runs on slot rows, B * S of them (S = every expert's slots, one expert each, weight
    1), not on the tokens: `expert_rows` mixes the tokens into the slots, `combine` mixes the slot
    outputs back into tokens. The token-level weights (combine mass per expert) feed statistics."""

    dispatch_TS: Tensor | None = None
    combine_TS: Tensor | None = None
    seq_T: Tensor | None = None
    num_seqs: int = 1
    slots_per_expert: int = 1

    def expert_rows(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, D = self.num_seqs, self.dispatch_TS.shape[1], x_TD.shape[1]
        slots_BSD = torch.einsum("tb,ts,td->bsd", self._seq_TB(x_TD.dtype), self.dispatch_TS.to(x_TD.dtype), x_TD)
        expert_S = torch.arange(S, device=x_TD.device) // self.slots_per_expert
        ids_N1 = expert_S.repeat(B)[:, None]
        return slots_BSD.reshape(B * S, D), torch.ones(B * S, 1, device=x_TD.device), ids_N1

    def combine(self, y_ND: Tensor) -> Tensor:
        B, S, D = self.num_seqs, self.combine_TS.shape[1], y_ND.shape[1]
        return torch.einsum("tb,ts,bsd->td", self._seq_TB(y_ND.dtype), self.combine_TS.to(y_ND.dtype), y_ND.view(B, S, D))

    def _seq_TB(self, dtype: torch.dtype) -> Tensor:
        return torch.nn.functional.one_hot(self.seq_T, self.num_seqs).to(dtype)


class SoftRouter(LinearRouter):
    balanced = False

    def __init__(self, hidden_size: int, num_experts: int, slots_per_expert: int = 1, **linear):
        super().__init__(hidden_size, num_experts * slots_per_expert, **linear)
        self.num_experts, self.slots_per_expert = num_experts, slots_per_expert

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "SoftRouter":
        return cls(hidden_size, num_experts, node.slots_per_expert, router_dtype=DTYPES[node.dtype])

    def forward(self, batch: RouteBatch) -> SoftRouting:
        x_TD = batch.x_RD
        T, E, P = x_TD.shape[0], self.num_experts, self.slots_per_expert
        logits_TS = self.logits(x_TD)
        combine_TS = logits_TS.softmax(dim=-1)
        mass_TE = combine_TS.view(T, E, P).sum(dim=-1)
        ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        dispatch_TS = _softmax_over_tokens(logits_TS, batch.valid_R, batch.seq_R, batch.num_seqs)
        return SoftRouting(mass_TE, ids_TE, ids_TE, probs_TE=mass_TE, dispatch_TS=dispatch_TS, combine_TS=combine_TS,
                           seq_T=batch.seq_R, num_seqs=batch.num_seqs, slots_per_expert=P)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}"
