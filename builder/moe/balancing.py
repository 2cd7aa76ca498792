"""Balancing terms: pure functions of one layer's routing statistics (never concatenated over
layers: transformers #31464). Every statistic is fp32 (probabilities) or int64 (counts), and
every term takes `mask_T`, the tokens that count (padding and tokens outside the term's scope
excluded: transformers #28505). Counts are the router's choices before capacity dropping; empty
slots (id -1, routers with a varying number of experts per token) count nowhere, and f_e is the
share of the counted assignments, so fixed-K routers get the usual n*K denominator.
With no token counted a term is 0, not NaN. The balanced value of each form is stated.

Every sum over tokens goes through `reduce` (identity here; under expert parallelism the sum over
every rank, `RouteBatch.reduce`), so a term over N ranks' local batches equals the term of the
concatenated batch on one process. Sequences never span ranks, so seq_aux's per-sequence
statistics stay local and only its average over sequences is reduced.

Aux-loss-free balancing (`aux_free_bias`) is not a loss: it moves routers' correction biases
after each optimiser step. Call `model.update_balancing()` then, or add `BalancingCallback` to a
transformers `Trainer`.

Legend: T tokens, E experts, K slots per token, B sequences; n = number of counted tokens.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from transformers import TrainerCallback

from moebuild.parallel.expert import local_sum


def _expert_counts(ids_TK: Tensor, mask_T: Tensor, num_experts: int, reduce=local_sum) -> Tensor:
    ids_N = ids_TK[mask_T].reshape(-1)
    return reduce(torch.bincount(ids_N[ids_N >= 0], minlength=num_experts))


def _mean_probs(probs_TE: Tensor, mask_T: Tensor, reduce=local_sum) -> Tensor:
    n = reduce(mask_T.sum()).clamp_min(1)
    return reduce((probs_TE.float() * mask_T[:, None]).sum(dim=0)) / n


def _normalized(probs_TE: Tensor) -> Tensor:
    """Scores as a distribution per token (sigmoid scores do not sum to 1; softmax is unchanged)."""
    probs_TE = probs_TE.float()
    return probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def switch_aux(probs_TE: Tensor, topk_ids_TK: Tensor, mask_T: Tensor, reduce=local_sum) -> Tensor:
    """Switch Transformer aux loss (Fedus et al. 2021, eq. 4), as DeepSpeed `top2gating`
    (MoE-LLaVA) computes it: E * sum_e f_e * P_e, with f_e the fraction of counted tokens whose
    first choice is e and P_e the mean score of e over counted tokens. Balanced router: 1.0."""
    E = probs_TE.shape[-1]
    n = reduce(mask_T.sum()).clamp_min(1)
    f_E = _expert_counts(topk_ids_TK[:, :1], mask_T, E, reduce).float() / n
    return E * (f_E * _mean_probs(probs_TE, mask_T, reduce)).sum()


def load_balance(probs_TE: Tensor, topk_ids_TK: Tensor, mask_T: Tensor, reduce=local_sum) -> Tensor:
    """GShard / Mixtral load-balancing loss over all K choices: E * sum_e f_e * P_e, with f_e the
    fraction of the counted assignments (n*K for fixed K) that go to e and P_e the mean score of e.
    Balanced: 1.0.

    transformers' `load_balancing_loss_func` divides the counts by n instead of n*K, so for one
    layer it returns exactly K times this value (a balanced router scores K there)."""
    E = probs_TE.shape[-1]
    counts_E = _expert_counts(topk_ids_TK, mask_T, E, reduce).float()
    f_E = counts_E / counts_E.sum().clamp_min(1)
    return E * (f_E * _mean_probs(probs_TE, mask_T, reduce)).sum()


def seq_aux(probs_TE: Tensor, topk_ids_TK: Tensor, mask_T: Tensor, seq_T: Tensor, num_seqs: int,
            reduce=local_sum) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (DeepSeek-AI 2024, eqs. 17-20; DeepSeek-V2's
    expert-level loss per sequence): per sequence, sum_e f_e * P_e with f_e = E * (share of the
    sequence's counted assignments going to e) and P_e the mean normalised score of e over its
    counted tokens; averaged over the sequences with a counted token. Balanced: 1.0."""
    E = probs_TE.shape[-1]
    ids_TK = topk_ids_TK.masked_fill(~mask_T[:, None], -1)
    valid_TK = ids_TK >= 0
    flat_N = (seq_T[:, None] * E + ids_TK.clamp_min(0))[valid_TK]
    counts_BE = torch.bincount(flat_N, minlength=num_seqs * E).view(num_seqs, E).float()
    f_BE = E * counts_BE / counts_BE.sum(dim=-1, keepdim=True).clamp_min(1)
    p_TE = _normalized(probs_TE) * mask_T[:, None]
    tokens_B = torch.zeros(num_seqs, device=probs_TE.device).index_add(0, seq_T, mask_T.float())
    p_BE = torch.zeros(num_seqs, E, device=probs_TE.device).index_add(0, seq_T, p_TE) / tokens_B.clamp_min(1)[:, None]
    counted_B = tokens_B > 0
    return reduce((f_BE * p_BE).sum(dim=-1)[counted_B].sum()) / reduce(counted_B.sum()).clamp_min(1)


def entropy(probs_TE: Tensor, mask_T: Tensor, reduce=local_sum) -> Tensor:
    """Mean over counted tokens of the entropy of the (normalised) router scores,
    -sum_e p_e ln p_e; adding it with coef > 0 sharpens routing. Uniform scores: ln E."""
    p_TE = _normalized(probs_TE)
    h_T = -(p_TE * p_TE.clamp_min(1e-20).log()).sum(dim=-1)
    return reduce((h_T * mask_T).sum()) / reduce(mask_T.sum()).clamp_min(1)


def z_loss(logits_TE: Tensor, mask_T: Tensor, reduce=local_sum) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over counted tokens of
    logsumexp(logits)^2. It has no balanced value; all-zero logits score (ln E)^2."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return reduce((z_T.square() * mask_T).sum()) / reduce(mask_T.sum()).clamp_min(1)


@dataclass
class BalancingTerm:
    """One balancing term of a layer: `coef * value(routing, mask_T, batch)` for every route whose
    router is `balanced`, over the route's tokens that `tokens` names (padding never counts)."""

    coef: float
    tokens: str = "all"
    name: ClassVar[str]

    def __post_init__(self):
        if self.tokens not in ("all", "text", "image"):
            raise ValueError(f"unknown token selector {self.tokens!r}; choose from all, text, image")

    @classmethod
    def from_spec(cls, node) -> "BalancingTerm":
        return cls(node.coef, node.tokens)

    def value(self, routing, mask_T: Tensor, batch) -> Tensor:
        raise NotImplementedError


class SwitchAux(BalancingTerm):
    name = "switch_aux"

    def value(self, routing, mask_T: Tensor, batch) -> Tensor:
        return switch_aux(routing.probs_TE, routing.topk_ids_TK, mask_T, batch.reduce)


class LoadBalance(BalancingTerm):
    name = "load_balance"

    def value(self, routing, mask_T: Tensor, batch) -> Tensor:
        return load_balance(routing.probs_TE, routing.topk_ids_TK, mask_T, batch.reduce)


class SeqAux(BalancingTerm):
    name = "seq_aux"

    def value(self, routing, mask_T: Tensor, batch) -> Tensor:
        return seq_aux(routing.probs_TE, routing.topk_ids_TK, mask_T, batch.seq_R, batch.num_seqs, batch.reduce)


class Entropy(BalancingTerm):
    name = "entropy"

    def value(self, routing, mask_T: Tensor, batch) -> Tensor:
        return entropy(routing.probs_TE, mask_T, batch.reduce)


class ZLoss(BalancingTerm):
    name = "z_loss"

    def value(self, routing, mask_T: Tensor, batch) -> Tensor:
        return z_loss(routing.logits_TE, mask_T, batch.reduce)


@dataclass
class BiasBalancing:
    """Aux-loss-free balancing (Wang et al. 2024): after each optimiser step, every router with a
    correction bias moves it by `rate * sign(mean load - load_e)`, loads counted over `tokens`."""

    rate: float
    tokens: str = "all"

    @classmethod
    def from_spec(cls, node) -> "BiasBalancing":
        return cls(node.rate, node.tokens)


class BalancingCallback(TrainerCallback):
    """Calls `model.update_balancing()` after every optimiser step of a transformers `Trainer`
    (aux-free bias updates, top-k curriculum steps)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            model.update_balancing()
