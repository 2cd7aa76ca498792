"""The router contract and what every router shares.

A router is a `Router` module called one way, `router(batch) -> Routing`: `batch` (moe/batch.py)
is what it may know of its route's tokens, `Routing` its decision (each token's K expert ids and
gate weights, plus what balancing and statistics read). Facts the layer needs are stated on the
class (`balanced`, `zero_init`, `fp32_buffers`) or set at construction (`has_correction_bias`),
never found by duck typing. Also here: score functions, router logits in the router's precision,
and capacity.

Capacity follows GShard (Lepikhin et al. 2020) / DeepSpeed `top2gating`: each expert takes at most
C = max(ceil(T * K * cf / E), min_capacity) slots. Drop policy "by_position" fills slots by choice
rank first (every token's first choice before any second choice), then by token position, as
DeepSpeed does; "by_score" keeps each expert's C highest-scoring slots (Megatron-LM's
`moe_token_drop_policy=probs`). A dropped slot gets id -1 and weight 0; the token keeps its
residual path (the layer's caller adds the residual).

Legend: T tokens, D hidden, E experts, K slots per token, A = T*K assignments.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moebuild.moe.batch import RouteBatch

DROP_POLICIES = ("by_position", "by_score")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""dtypes by the names specs and the CLI use (a router's `dtype`, `build(dtype=...)`)."""


@dataclass
class Routing:
    """A router's decision. Slots with id -1 carry weight 0 and cost nothing."""

    weights_TK: Tensor  # fp32 gate weights; 0 for empty or dropped slots
    ids_TK: Tensor  # int64 expert ids after capacity; -1 = empty or dropped slot
    topk_ids_TK: Tensor  # int64 selection before capacity (what balancing counts); -1 = empty slot
    logits_TE: Tensor | None = None  # raw router logits, fp32
    probs_TE: Tensor | None = None  # scores after softmax / sigmoid, fp32
    capacity: int | None = None  # slots per expert; None = dropless
    tail_T: Tensor | None = None  # bool: tokens routed as long-tail (LTDR dynamic_topk)
    dense: bool = False  # every token takes every expert, in order, none dropped (see ExpertPool.forward)

    def apply(self, pool, x_TD: Tensor) -> Tensor:
        """The tokens' outputs: the pool called on `expert_rows`, then `combine`d (every router's expert
        call goes through here; a router changes only which rows the pool sees)."""
        return self.combine(pool(*self.expert_rows(x_TD), dense=self.dense))

    def expert_rows(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, weights_NK, ids_NK) the pool is called on: the tokens themselves, unless the router
        mixes tokens into other rows first (Soft MoE's slots)."""
        return x_TD, self.weights_TK, self.ids_TK

    def combine(self, y_ND: Tensor) -> Tensor:
        """The tokens' outputs from the pool's outputs on `expert_rows` (the rows are the tokens here)."""
        return y_ND


SCORES = {
    "softmax": lambda logits_TE: logits_TE.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
}


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(map(str, choices))}")


def gumbel_like(x: Tensor) -> Tensor:
    return -torch.empty_like(x).exponential_().log()


def router_logits(x_TD: Tensor, weight_ED: Tensor, router_dtype: torch.dtype) -> Tensor:
    """Logits computed in `router_dtype` and returned in fp32 (sglang #38695, vllm #14027)."""
    return F.linear(x_TD.to(router_dtype), weight_ED.to(router_dtype)).float()


@dataclass(frozen=True)
class Capacity:
    """Capacity factors for training and evaluation (None = dropless), the floor and drop policy."""

    train: float | None = None
    eval: float | None = None
    min: int = 0
    policy: str = "by_position"

    def __post_init__(self):
        check_choice("drop policy", self.policy, DROP_POLICIES)

    @classmethod
    def from_spec(cls, node) -> "Capacity | None":
        return None if node is None else cls(node.train, node.eval, node.min, node.drop)

    def slots(self, num_tokens: int, top_k: int, num_experts: int, training: bool) -> int | None:
        factor = self.train if training else self.eval
        if factor is None:
            return None
        return max(math.ceil(num_tokens * top_k * factor / num_experts), self.min)

    def apply(self, ids_TK: Tensor, weights_TK: Tensor, num_experts: int, top_k: int, valid_T: Tensor,
              training: bool) -> tuple[Tensor, Tensor, int | None]:
        """(ids, weights, capacity) with the slots over capacity dropped (id -1, weight 0).

        Capacity is sized from the real tokens and filled by them only: a padding token's slots are
        dropped first, so padding never takes a slot from a real token (DeepSpeed counts padding)."""
        capacity = self.slots(int(valid_T.sum()), top_k, num_experts, training)
        if capacity is None:
            return ids_TK, weights_TK, None
        keep_TK = capacity_keep(ids_TK.masked_fill(~valid_T[:, None], -1), weights_TK, num_experts, capacity,
                                self.policy)
        return ids_TK.masked_fill(~keep_TK, -1), weights_TK.masked_fill(~keep_TK, 0.0), capacity


def capacity_keep(ids_TK: Tensor, scores_TK: Tensor | None, num_experts: int, capacity: int, policy: str = "by_position") -> Tensor:
    """Which selected slots fit under `capacity` (empty slots, id -1, are never kept)."""
    T, K = ids_TK.shape
    ids_A = ids_TK.t().reshape(-1)  # rank-major: all first choices, then all second, ...
    ids_A = ids_A.masked_fill(ids_A < 0, num_experts)  # empty slots go to a bucket never kept
    if policy == "by_score":
        pre_A = torch.argsort(scores_TK.t().reshape(-1), descending=True, stable=True)
    else:
        pre_A = torch.arange(ids_A.numel(), device=ids_A.device)
    order_A = pre_A[torch.argsort(ids_A[pre_A], stable=True)]
    counts_E = torch.bincount(ids_A, minlength=num_experts + 1)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_A = torch.empty_like(ids_A)
    rank_A[order_A] = torch.arange(ids_A.numel(), device=ids_A.device) - starts_E[ids_A[order_A]]
    return ((rank_A < capacity) & (ids_A < num_experts)).view(K, T).t()


class Router(nn.Module):
    """Base of every router module: `forward(batch: RouteBatch) -> Routing`.

    `balanced`: balancing terms (aux losses) apply to its routing. `zero_init`: parameters and
    buffers that start at zero (everything else ~ Normal(0, init_std)). `fp32_buffers`: balancing
    state kept in fp32 whatever the model's dtype -- a bf16 correction bias stalls (0.5 + 0.001
    rounds back to 0.5) -- and moved, not cast, by `.to()`. `has_correction_bias`: it has an
    aux-loss-free correction bias, whose loads the layer counts in training forwards.
    """

    balanced: ClassVar[bool] = True
    zero_init: ClassVar[tuple[str, ...]] = ()
    fp32_buffers: ClassVar[tuple[str, ...]] = ()
    init_std: float = 0.02
    has_correction_bias: bool = False

    def forward(self, batch: RouteBatch) -> Routing:
        raise NotImplementedError

    def route(self, x_TD: Tensor, **known) -> Routing:
        """Route tokens given on their own (`RouteBatch.of(x_TD, **known)`): for tests and standalone use."""
        return self(RouteBatch.of(x_TD, **known))

    def count_load(self, ids_TK: Tensor) -> None:
        """Add a training forward's selections to the load the next bias update reads (biased routers)."""

    def update_balancing(self, bias_rate: float = 0.0) -> None:
        """Called after each optimiser step: move a correction bias, advance a curriculum (none here)."""

    def reset_parameters(self) -> None:
        init_router(self, nn.init.normal_, nn.init.zeros_)

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self.fp32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = (torch.empty_like(before, device=after.device) if before.is_meta
                                       else before.to(after.device))
        return self


def init_router(router: Router, normal_, zeros_) -> None:
    """Initialise a router's own tensors with the given init functions (torch's, or transformers',
    which skip tensors a checkpoint has loaded)."""
    for name, tensor in (*router.named_parameters(recurse=False), *router.named_buffers(recurse=False)):
        if name in router.zero_init:
            zeros_(tensor)
        elif isinstance(tensor, nn.Parameter):
            normal_(tensor, std=router.init_std)


class LinearRouter(Router):
    """A router scored by a bias-free linear map `weight` [rows, D] (Mixtral's layout), rows = E
    for token-choice routers; logits in `router_dtype`, returned in fp32."""

    def __init__(
        self,
        hidden_size: int,
        rows: int,
        router_dtype: torch.dtype = torch.float32,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.router_dtype, self.init_std = router_dtype, init_std
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def logits(self, x_TD: Tensor) -> Tensor:
        return router_logits(x_TD, self.weight, self.router_dtype)
