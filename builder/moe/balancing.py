"""Balancing terms: pure functions of one layer's routing statistics (never concatenated over
layers: transformers #31464). Every statistic is fp32 (probabilities) or int64 (counts), and
every term takes `mask_T`, the tokens that count (padding and tokens outside the term's scope
excluded: transformers #28505). Counts are the router's choices before capacity dropping.
With no token counted a term is 0, not NaN.

Legend: T tokens, E experts, K slots per token; n = number of counted tokens.
"""

from collections.abc import Callable

import torch
from torch import Tensor


def _expert_counts(ids_TK: Tensor, mask_T: Tensor, num_experts: int) -> Tensor:
    return torch.bincount(ids_TK[mask_T].reshape(-1), minlength=num_experts)


def _mean_probs(probs_TE: Tensor, mask_T: Tensor) -> Tensor:
    n = mask_T.sum().clamp_min(1)
    return (probs_TE.float() * mask_T[:, None]).sum(dim=0) / n


def switch_aux(probs_TE: Tensor, topk_ids_TK: Tensor, mask_T: Tensor) -> Tensor:
    """Switch Transformer aux loss (Fedus et al. 2021, eq. 4), as DeepSpeed `top2gating`
    (MoE-LLaVA) computes it: E * sum_e f_e * P_e, with f_e the fraction of counted tokens whose
    first choice is e and P_e the mean score of e over counted tokens. Balanced router: 1.0."""
    E = probs_TE.shape[-1]
    n = mask_T.sum().clamp_min(1)
    f_E = _expert_counts(topk_ids_TK[:, :1], mask_T, E).float() / n
    return E * (f_E * _mean_probs(probs_TE, mask_T)).sum()


def load_balance(probs_TE: Tensor, topk_ids_TK: Tensor, mask_T: Tensor) -> Tensor:
    """GShard / Mixtral load-balancing loss over all K choices: E * sum_e f_e * P_e, with f_e the
    fraction of the n*K assignments that go to e and P_e the mean score of e. Balanced: 1.0.

    transformers' `load_balancing_loss_func` divides the counts by n instead of n*K, so for one
    layer it returns exactly K times this value (a balanced router scores K there)."""
    E, K = probs_TE.shape[-1], topk_ids_TK.shape[-1]
    n = mask_T.sum().clamp_min(1)
    f_E = _expert_counts(topk_ids_TK, mask_T, E).float() / (n * K)
    return E * (f_E * _mean_probs(probs_TE, mask_T)).sum()


def z_loss(logits_TE: Tensor, mask_T: Tensor) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over counted tokens of
    logsumexp(logits)^2. It has no balanced value; all-zero logits score (ln E)^2."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return (z_T.square() * mask_T).sum() / mask_T.sum().clamp_min(1)


TermFn = Callable[[object, Tensor], Tensor]


def routing_term(fn: Callable[..., Tensor], *fields: str) -> TermFn:
    """Adapt a pure statistic to the layer's call `term(routing, mask_T)`."""

    def term(routing, mask_T: Tensor) -> Tensor:
        return fn(*(getattr(routing, name) for name in fields), mask_T)

    term.__name__ = fn.__name__
    return term


# balancing term type -> fn(routing, mask_T); adding a term is one function and one entry here.
TERMS: dict[str, TermFn] = {
    "switch_aux": routing_term(switch_aux, "probs_TE", "topk_ids_TK"),
    "load_balance": routing_term(load_balance, "probs_TE", "topk_ids_TK"),
    "z_loss": routing_term(z_loss, "logits_TE"),
}
