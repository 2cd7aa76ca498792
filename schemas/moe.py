"""The moe section: expert pools, the routing graph (routes), the balancing regime and dispatch.

Router kinds follow Switch/GShard top-k gating (Fedus et al. 2021; Lepikhin et al. 2020) and
DeepSeekMoE's shared experts (Dai et al. 2024): a `dense` route over a shared pool plus a `topk`
route over the routed pool.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from .base import Activation, SpecModel, TokenSelector
from .routing import ContextRouter, HierarchicalRouter, ModalityMixRouter, QueryRouter

MAX_CAPACITY_FACTOR = 64.0


class FirstKDense(SpecModel):
    """Dense FFN in the first k layers, MoE in all the others (DeepSeekMoE first_k_dense_replace)."""

    first_k_dense: NonNegativeInt
    """How many leading layers keep their dense FFN."""


LayerPattern = Union[Literal["all", "every_other", "first_half", "second_half"], FirstKDense, list[NonNegativeInt]]


class PoolSpec(SpecModel):
    """A named set of identically shaped experts, stored stacked (transformers-5 layout)."""

    num_experts: PositiveInt
    """Number of experts in the pool."""
    intermediate_size: PositiveInt
    """Hidden width of each expert."""
    activation: Activation = "silu"
    """Expert activation."""
    gated: bool = True
    """true = SwiGLU-style gate/up projections; false = fc1/fc2 (Phi-2)."""
    bias: bool = False
    """Biases on the expert projections (Phi-2 experts have them)."""
    init: Literal["random", "upcycle"] = "random"
    """random = normal init; upcycle = every expert a copy of the layer's dense FFN (MoE-LLaVA)."""


class NoiseSpec(SpecModel):
    """Router noise, applied in training only, to the selection (weights come from the clean scores)."""

    type: Literal["none", "gaussian", "gumbel", "jitter"]
    """gaussian/gumbel: added to the logits; jitter: the input multiplied by U(1-std, 1+std)."""
    std: PositiveFloat | None = None
    """Gaussian standard deviation (default 1.0) or jitter epsilon (default 0.01); unused for gumbel."""


class CapacitySpec(SpecModel):
    """Expert capacity = max(ceil(tokens * top_k * factor / num_experts), min); overflow is dropped."""

    train: PositiveFloat | None = Field(default=None, le=MAX_CAPACITY_FACTOR)
    """Capacity factor in training; null = dropless."""
    eval: PositiveFloat | None = Field(default=None, le=MAX_CAPACITY_FACTOR)
    """Capacity factor in evaluation and generation; null = dropless."""
    min: NonNegativeInt = 0
    """Smallest capacity per expert."""


class TopKRouter(SpecModel):
    """Token-choice top-k: softmax (or sigmoid) scores over a pool, each token to its k best experts."""

    type: Literal["topk"]
    """Selects this kind: topk."""
    top_k: PositiveInt
    """Experts per token."""
    score: Literal["softmax", "sigmoid"] = "softmax"
    """Score function, applied before selection (softmax over all experts, then top-k)."""
    normalize: bool = False
    """Renormalise each token's k weights to sum to 1."""
    scale: PositiveFloat = 1.0
    """Routed scaling factor applied to the weights (after normalisation, if any)."""
    noise: NoiseSpec | None = None
    """Noise on the selection in training; null = none."""
    capacity: CapacitySpec | None = None
    """Capacity limits with token dropping; null = dropless."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the router logits, softmax and top-k."""


class DenseRouter(SpecModel):
    """Every token to every expert of the pool with weight 1 (shared experts)."""

    type: Literal["dense"]
    """Selects this kind: dense."""


RouterSpec = Annotated[
    Union[TopKRouter, DenseRouter, HierarchicalRouter, ModalityMixRouter, ContextRouter, QueryRouter],
    Field(discriminator="type"),
]


class RouteSpec(SpecModel):
    """One edge of the routing graph: these tokens, through this router, to this pool."""

    tokens: TokenSelector = "all"
    """Which tokens take this route."""
    pool: str
    """Name of the expert pool (a key of moe.pools)."""
    router: RouterSpec
    """How the tokens pick experts of the pool."""


class _BalancingTerm(SpecModel):
    coef: NonNegativeFloat
    """Weight of the term in the loss (summed over MoE layers)."""
    tokens: TokenSelector = "all"
    """Which tokens the statistics are taken over (padding never counts)."""


class SwitchAux(_BalancingTerm):
    """Switch aux loss E * sum_e f_e * P_e, f_e = share of tokens whose top-1 is e; 1.0 when balanced."""

    type: Literal["switch_aux"]
    """Selects this kind: switch_aux."""


class LoadBalance(_BalancingTerm):
    """GShard/Mixtral load balance E * sum_e f_e * P_e, f_e = share of the top-k assignments; 1.0 when balanced."""

    type: Literal["load_balance"]
    """Selects this kind: load_balance."""


class ZLoss(_BalancingTerm):
    """Router z-loss mean(logsumexp(logits)^2) (ST-MoE): keeps router logits small."""

    type: Literal["z_loss"]
    """Selects this kind: z_loss."""
    coef: NonNegativeFloat = 0.001
    """Weight of the term in the loss (summed over MoE layers)."""


BalancingSpec = Annotated[Union[SwitchAux, LoadBalance, ZLoss], Field(discriminator="type")]


class DispatchSpec(SpecModel):
    """How tokens reach their experts' weights."""

    backend: Literal["auto", "torch", "eager"] = "auto"
    """auto = the fastest backend for the device (the sort-based torch path on CPU); eager = the per-expert reference loop."""


class MoESpec(SpecModel):
    """Which layers are MoE, their expert pools, the routing graph and the balancing regime."""

    layers: LayerPattern = "all"
    """Layers whose FFN becomes an MoE layer: all | every_other (0, 2, ...) | first_half | second_half | {first_k_dense: k} | [indices]."""
    pools: dict[str, PoolSpec] = Field(min_length=1)
    """Named expert pools."""
    routes: list[RouteSpec] = Field(min_length=1)
    """The routing graph; a token matched by several routes gets the sum of their outputs."""
    balancing: list[BalancingSpec] = []
    """Balancing terms added to the loss, each over its tokens."""
    dispatch: DispatchSpec = DispatchSpec()
    """Expert dispatch backend."""


def moe_layer_indices(layers: LayerPattern, num_layers: int) -> list[int]:
    """The decoder layers a layer pattern turns into MoE layers."""
    if isinstance(layers, list):
        return sorted(set(layers))
    if isinstance(layers, FirstKDense):
        return list(range(layers.first_k_dense, num_layers))
    return {
        "all": list(range(num_layers)),
        "every_other": list(range(0, num_layers, 2)),
        "first_half": list(range(num_layers // 2)),
        "second_half": list(range(num_layers // 2, num_layers)),
    }[layers]
