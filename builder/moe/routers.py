"""Routers: decide, for each token, which experts it goes to and with what gate weight.

`TopKRouter` is token-choice top-k as in Switch Transformer (Fedus et al. 2021) and GShard
(Lepikhin et al. 2020), in transformers' Mixtral layout (a bias-free linear `weight` [E, D]).
Order: score (softmax or sigmoid) over all E experts, then take the top k -- Mixtral's order;
top-k-then-softmax (transformers #27942) is a different router, not an option of this one.
Capacity follows GShard / DeepSpeed `top2gating`: each expert takes at most
C = max(ceil(T * K * cf / E), min_capacity) slots, filled by choice rank first (every token's
first choice before any second choice), then by token position; overflow slots are dropped
(id -1, weight 0, no renormalisation) and the token keeps only its residual path.
`DenseRouter` sends every token to every expert with weight 1: the shared experts of
DeepSeek-MoE / DeepSeek-VL2.

Every router returns a `Routing`; a router whose class sets `balanced = True` produces scores
that balancing terms (moe/balancing.py) are computed from.

Legend: T tokens, D hidden, E experts, K slots per token.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class Routing:
    weights_TK: Tensor  # fp32 gate weights; 0 for dropped slots
    ids_TK: Tensor  # int64 expert ids; -1 for slots dropped by capacity
    topk_ids_TK: Tensor  # int64 selection before capacity dropping (what balancing counts)
    logits_TE: Tensor | None = None  # raw router logits, fp32
    probs_TE: Tensor | None = None  # scores after softmax / sigmoid, fp32
    capacity: int | None = None  # slots per expert; None = dropless


SCORES = {
    "softmax": lambda logits_TE: logits_TE.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
}


DEFAULT_NOISE_STD = {"gaussian": 1.0, "jitter": 0.01}


def gumbel_like(x: Tensor) -> Tensor:
    return -torch.empty_like(x).exponential_().log()


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(map(str, choices))}")


def capacity_keep(topk_ids_TK: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which slots fit under `capacity`: priority by choice rank k, then by token position."""
    T, K = topk_ids_TK.shape
    ids_A = topk_ids_TK.t().reshape(-1)  # rank-major: all first choices, then all second, ...
    order_A = torch.argsort(ids_A, stable=True)
    counts_E = torch.bincount(ids_A, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_A = torch.empty_like(ids_A)
    rank_A[order_A] = torch.arange(ids_A.numel(), device=ids_A.device) - starts_E[ids_A[order_A]]
    return (rank_A < capacity).view(K, T).t()


class TopKRouter(nn.Module):
    balanced = True

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        score: str = "softmax",
        normalize: bool = False,
        scale: float = 1.0,
        noise: str | None = None,
        noise_std: float | None = None,
        capacity_train: float | None = None,
        capacity_eval: float | None = None,
        min_capacity: int = 0,
        router_dtype: torch.dtype = torch.float32,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """noise (training only): "gaussian" adds N(0, noise_std^2) (default std 1.0) and "gumbel"
        adds Gumbel(0, 1) noise to the logits used for selection (gate weights come from the
        clean scores); "jitter" multiplies the input by U(1 - noise_std, 1 + noise_std), default
        0.01 as in Switch Transformer."""
        super().__init__()
        _check_choice("score", score, SCORES)
        _check_choice("noise", noise, (None, "gaussian", "gumbel", "jitter"))
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.score, self.normalize, self.scale = score, normalize, scale
        self.noise = noise
        self.noise_std = noise_std if noise_std is not None else DEFAULT_NOISE_STD.get(noise)
        self.capacity_train, self.capacity_eval = capacity_train, capacity_eval
        self.min_capacity = min_capacity
        self.router_dtype = router_dtype
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)

    def capacity(self, num_tokens: int) -> int | None:
        factor = self.capacity_train if self.training else self.capacity_eval
        if factor is None:
            return None
        slots = math.ceil(num_tokens * self.top_k * factor / self.num_experts)
        return max(slots, self.min_capacity)

    def selection_logits(self, logits_TE: Tensor) -> Tensor:
        if not self.training or self.noise in (None, "jitter"):
            return logits_TE
        if self.noise == "gaussian":
            return logits_TE + torch.randn_like(logits_TE) * self.noise_std
        return logits_TE + gumbel_like(logits_TE)

    def forward(self, x_TD: Tensor) -> Routing:
        if self.training and self.noise == "jitter":
            eps = self.noise_std
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        rd = self.router_dtype
        logits_TE = F.linear(x_TD.to(rd), self.weight.to(rd)).float()
        score = SCORES[self.score]
        probs_TE = score(logits_TE)
        selection_TE = score(self.selection_logits(logits_TE))
        topk_ids_TK = selection_TE.topk(self.top_k, dim=-1).indices
        weights_TK = probs_TE.gather(1, topk_ids_TK)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * self.scale
        ids_TK = topk_ids_TK
        capacity = self.capacity(x_TD.shape[0])
        if capacity is not None:
            keep_TK = capacity_keep(topk_ids_TK, self.num_experts, capacity)
            ids_TK = topk_ids_TK.masked_fill(~keep_TK, -1)
            weights_TK = weights_TK.masked_fill(~keep_TK, 0.0)
        return Routing(weights_TK, ids_TK, topk_ids_TK, logits_TE, probs_TE, capacity)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
            f"normalize={self.normalize}, scale={self.scale}, noise={self.noise!r}, "
            f"capacity=({self.capacity_train}, {self.capacity_eval}, min={self.min_capacity})"
        )


class DenseRouter(nn.Module):
    balanced = False

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_TD: Tensor) -> Routing:
        T, E = x_TD.shape[0], self.num_experts
        ids_TK = torch.arange(E, device=x_TD.device).expand(T, E)
        weights_TK = torch.ones(T, E, device=x_TD.device)
        return Routing(weights_TK, ids_TK, ids_TK)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"
