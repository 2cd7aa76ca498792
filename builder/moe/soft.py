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

from moebuild.moe.routing import LinearRouter, RouteTokens, Routing


def _softmax_over_tokens(logits_TS: Tensor, tokens: RouteTokens) -> Tensor:
    """Softmax over the non-padding tokens of each sequence, per slot."""
    B, S = tokens.num_seqs, logits_TS.shape[1]
    masked_TS = logits_TS.masked_fill(~tokens.valid_T[:, None], float("-inf"))
    index_TS = tokens.seq_T[:, None].expand_as(masked_TS)
    max_BS = torch.full((B, S), float("-inf"), device=logits_TS.device).scatter_reduce(0, index_TS, masked_TS.detach(), "amax")
    exp_TS = (masked_TS - max_BS[tokens.seq_T].clamp_min(-1e30)).exp()  # padding: exp(-inf) = 0
    sum_BS = torch.zeros(B, S, device=logits_TS.device).index_add(0, tokens.seq_T, exp_TS)
    return exp_TS / sum_BS[tokens.seq_T].clamp_min(1e-30)


@dataclass
class SoftRouting(Routing):
    dispatch_TS: Tensor | None = None
    combine_TS: Tensor | None = None
    tokens: RouteTokens | None = None
    slots_per_expert: int = 1

    def apply(self, pool, x_TD: Tensor) -> Tensor:
        B, (T, S), D = self.tokens.num_seqs, self.dispatch_TS.shape, x_TD.shape[1]
        seq_TB = torch.nn.functional.one_hot(self.tokens.seq_T, B).to(x_TD.dtype)
        slots_BSD = torch.einsum("tb,ts,td->bsd", seq_TB, self.dispatch_TS.to(x_TD.dtype), x_TD)
        expert_S = torch.arange(S, device=x_TD.device) // self.slots_per_expert
        ids_N1 = expert_S.repeat(B)[:, None]  # N = B * S slot rows, one expert each, weight 1
        y_ND = pool(slots_BSD.reshape(B * S, D), torch.ones(B * S, 1, device=x_TD.device), ids_N1)
        return torch.einsum("tb,ts,bsd->td", seq_TB, self.combine_TS.to(x_TD.dtype), y_ND.view(B, S, D))


class SoftRouter(LinearRouter):
    balanced = False

    def __init__(self, hidden_size: int, num_experts: int, slots_per_expert: int = 1, **linear):
        super().__init__(hidden_size, num_experts * slots_per_expert, **linear)
        self.num_experts, self.slots_per_expert = num_experts, slots_per_expert

    def forward(self, x_TD: Tensor, tokens: RouteTokens | None = None) -> SoftRouting:
        tokens = tokens or RouteTokens.single(x_TD.shape[0], x_TD.device)
        T, E, P = x_TD.shape[0], self.num_experts, self.slots_per_expert
        logits_TS = self.logits(x_TD)
        combine_TS = logits_TS.softmax(dim=-1)
        mass_TE = combine_TS.view(T, E, P).sum(dim=-1)
        ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        return SoftRouting(
            mass_TE, ids_TE, ids_TE, probs_TE=mass_TE,
            dispatch_TS=_softmax_over_tokens(logits_TS, tokens), combine_TS=combine_TS, tokens=tokens, slots_per_expert=P,
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}"
