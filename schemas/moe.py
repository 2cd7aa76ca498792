"""The moe section: expert pools, the routing graph (routes), the balancing regime and dispatch.

Router kinds follow Switch/GShard top-k gating (Fedus et al. 2021; Lepikhin et al. 2020) and
DeepSeekMoE's shared experts (Dai et al. 2024): a `dense` route over a shared pool plus a `topk`
route over the routed pool.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator

from moebuild.schemas.base import (
    Activation,
    ExpertCount,
    FFNWidth,
    RouterSpecBase,
    SpecModel,
    TokenSelector,
    example,
    up_to,
)
from moebuild.schemas.routing import (
    ContextRouterSpec,
    HierarchicalRouterSpec,
    ModalityMixRouterSpec,
    QueryRouterSpec,
)

MAX_CAPACITY_FACTOR = 64.0
LayerIndex = up_to(1_023, low=0)


class FirstKDenseSpec(SpecModel):
    """Dense FFN in the first k layers, MoE in all the others (DeepSeekMoE first_k_dense_replace)."""

    first_k_dense: LayerIndex
    """How many leading layers keep their dense FFN."""


LayerPattern = Union[Literal["all", "every_other", "first_half", "second_half"], FirstKDenseSpec, list[LayerIndex]]


class PoolSpec(SpecModel):
    """A named set of identically shaped experts, stored stacked (transformers-5 layout)."""

    num_experts: ExpertCount
    """Number of experts in the pool."""
    intermediate_size: FFNWidth
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
    """Expert capacity = max(ceil(tokens * top_k * factor / num_experts), min); overflow is dropped
    and the token keeps its residual path."""

    train: PositiveFloat | None = Field(default=None, le=MAX_CAPACITY_FACTOR)
    """Capacity factor in training; null = dropless."""
    eval: PositiveFloat | None = Field(default=None, le=MAX_CAPACITY_FACTOR)
    """Capacity factor in evaluation and generation; null = dropless."""
    min: up_to(1 << 20, low=0) = 0
    """Smallest capacity per expert."""
    drop: Literal["by_position", "by_score"] = "by_position"
    """Which slots an over-full expert keeps: by_position = all first choices, then second choices, each in token order (DeepSpeed); by_score = its highest gate weights."""


def _capacity_compares(capacity: CapacitySpec | None, top_k: int) -> str | None:
    """Capacity dropping by score, or by position with several choices per token (a token's later
    choice waits behind every token's first), makes a token's experts depend on other tokens."""
    if capacity is None or (capacity.train is None and capacity.eval is None):
        return None
    if capacity.drop == "by_score":
        return "capacity keeps each expert's highest-scoring tokens of the call"
    if top_k > 1:
        return "capacity takes every token's first choice before any token's second"
    return None


class GroupSpec(SpecModel):
    """Group-limited selection (DeepSeek n_group / topk_group): experts split into equal groups, only
    the best top_groups groups per token are selectable (the others' scores become 0.0, as in DeepSeek's code)."""

    num_groups: ExpertCount
    """Number of expert groups (must divide the pool's num_experts)."""
    top_groups: ExpertCount
    """Groups kept per token."""
    rank_by: Literal["top2_sum", "max"] = "top2_sum"
    """How a group is ranked: top2_sum = the sum of its two best (biased) expert scores (DeepSeek-V3 noaux_tc); max = its best expert score (DeepSeek-V2 group_limited_greedy)."""

    @model_validator(mode="after")
    def _top_groups_fit(self):
        if self.top_groups > self.num_groups:
            raise ValueError(f"top_groups ({self.top_groups}) must be <= num_groups ({self.num_groups})")
        return self


class CurriculumSpec(SpecModel):
    """Top-k curriculum: k = min(top_k, start_k + step // steps_per_k), step = optimiser steps counted by model.update_balancing()."""

    start_k: ExpertCount = 1
    """k at step 0."""
    steps_per_k: up_to(10**9)
    """Optimiser steps between k and k + 1."""


RouterDtype = Literal["float32", "bfloat16", "float16"]


class CorrectionBiasSpec(SpecModel):
    """Aux-free balancing on the router itself: `bias: {update_rate: r}` is `bias: true` plus an aux_free_bias term with rate r over the route's tokens."""

    update_rate: PositiveFloat = 0.001
    """Update speed gamma of b_e += gamma * sign(mean load - load_e) after each optimiser step."""


class TopKRouterSpec(RouterSpecBase):
    """Token-choice top-k: softmax (or sigmoid) scores over a pool, each token to its k best experts."""

    model_config = example({"type": "topk", "top_k": 2, "capacity": {"train": 1.0, "eval": 1.0, "drop": "by_score"}})

    type: Literal["topk"]
    """Selects this kind: topk."""
    top_k: ExpertCount
    """Experts per token."""
    score: Literal["softmax", "sigmoid"] = "softmax"
    """Score function over the router logits."""
    order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    """softmax_topk: score all experts, keep the k best (Mixtral, DeepSeek); topk_softmax: keep the k best logits, softmax over those k (needs score softmax)."""
    normalize: bool = False
    """Renormalise each token's k weights to sum to 1."""
    scale: PositiveFloat = 1.0
    """Routed scaling factor applied to the weights (after normalisation, if any)."""
    bias: bool | CorrectionBiasSpec = False
    """A correction bias (buffer e_score_correction_bias) added to the scores for selection only (DeepSeek-V3 noaux_tc); true = moved by an aux_free_bias balancing term (or fixed, as loaded, without one); {update_rate} = moved at that rate."""
    groups: GroupSpec | None = None
    """Group-limited selection; null = all experts selectable."""
    noise: NoiseSpec | None = None
    """Noise on the selection in training; null = none."""
    expert_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """In training, each token-expert pair is unselectable with this probability."""
    curriculum: CurriculumSpec | None = None
    """Raise k with training steps; null = top_k throughout."""
    capacity: CapacitySpec | None = None
    """Capacity limits with token dropping; null = dropless."""
    dtype: RouterDtype = "float32"
    """Precision of the router logits (scores and top-k are always fp32)."""

    @model_validator(mode="after")
    def _order_needs_softmax(self):
        if self.order == "topk_softmax" and self.score != "softmax":
            raise ValueError("order topk_softmax needs score softmax")
        return self

    def experts_per_token(self, num_experts: int) -> int:
        return self.top_k

    def compares_tokens(self) -> str | None:
        return _capacity_compares(self.capacity, self.top_k)


class DeepSpeedTop2RouterSpec(RouterSpecBase):
    """MoE-LLaVA's gate (DeepSpeed top2gating): softmax; top-1 argmax; second = argmax(logits + Gumbel) without the first, in training and evaluation; capacity max(ceil(2*T*cf/E), min) filled first choices first, in token order; kept gates renormalised."""

    model_config = example({"type": "deepspeed_top2", "capacity": {"train": 1.0, "eval": 1.0, "min": 0}})

    type: Literal["deepspeed_top2"]
    """Selects this kind: deepspeed_top2."""
    capacity: CapacitySpec | None = None
    """Capacity factors (MoE-LLaVA: train 1.5, eval 2.0, min 0); drop must be by_position; null = dropless."""
    eval_noise: bool = True
    """Gumbel noise on the second choice in evaluation too, as DeepSpeed 0.9.5 does; false = deterministic evaluation (second-best logit)."""
    dtype: RouterDtype = "float32"
    """Precision of the router logits."""

    @model_validator(mode="after")
    def _by_position(self):
        if self.capacity is not None and self.capacity.drop != "by_position":
            raise ValueError("deepspeed_top2 drops by_position")
        return self

    def experts_per_token(self, num_experts: int) -> int:
        return 2

    def compares_tokens(self) -> str | None:
        return _capacity_compares(self.capacity, 2)


class ExpertChoiceRouterSpec(RouterSpecBase):
    """Expert choice (Zhou et al. 2022): each expert takes the capacity_factor * n / E tokens of the call it scores highest. Not causal: a token's routing depends on later tokens."""

    model_config = example({"type": "expert_choice", "capacity_factor": 2.0})

    type: Literal["expert_choice"]
    """Selects this kind: expert_choice."""
    capacity_factor: PositiveFloat = Field(default=2.0, le=MAX_CAPACITY_FACTOR)
    """Average experts per token."""
    dtype: RouterDtype = "float32"
    """Precision of the router logits."""

    def experts_per_token(self, num_experts: int) -> int:
        return min(num_experts, math.ceil(self.capacity_factor))  # on average; a token may get more

    def compares_tokens(self) -> str | None:
        return "each expert picks its tokens among all tokens of the call"


class SoftRouterSpec(RouterSpecBase):
    """Soft MoE (Puigcerver et al. 2024): expert slots take softmax-weighted mixes of one sequence's tokens in the call; tokens take mixes of slot outputs. Not causal."""

    model_config = example({"type": "soft", "slots_per_expert": 2})

    type: Literal["soft"]
    """Selects this kind: soft."""
    slots_per_expert: up_to(1_024) = 1
    """Slots each expert processes per sequence."""
    dtype: RouterDtype = "float32"
    """Precision of the router logits."""

    def params(self, num_experts: int, hidden: int) -> int:
        return num_experts * self.slots_per_expert * hidden

    def experts_per_token(self, num_experts: int) -> int:
        return num_experts  # through the slots

    def compares_tokens(self) -> str | None:
        return "every slot mixes all tokens of a sequence"


class ThresholdRouterSpec(RouterSpecBase):
    """Top-p routing: each token takes its smallest set of best experts whose softmax mass reaches threshold, at most max_experts."""

    model_config = example({"type": "threshold", "threshold": 0.6, "max_experts": 3})

    type: Literal["threshold"]
    """Selects this kind: threshold."""
    threshold: float = Field(gt=0.0, le=1.0)
    """Probability mass p to reach."""
    max_experts: ExpertCount
    """Most experts per token."""
    normalize: bool = False
    """Renormalise each token's weights to sum to 1."""
    scale: PositiveFloat = 1.0
    """Scaling factor applied to the weights."""
    dtype: RouterDtype = "float32"
    """Precision of the router logits."""

    def experts_per_token(self, num_experts: int) -> int:
        return self.max_experts


class DynamicTopKRouterSpec(RouterSpecBase):
    """LTDR (Cai et al. 2025): tokens whose routing-probability variance exceeds the mean over the route's tokens in the batch take tail_top_k experts, the others top_k; at inference too."""

    model_config = example({"type": "dynamic_topk", "top_k": 2, "tail_top_k": 4, "normalize": True})

    type: Literal["dynamic_topk"]
    """Selects this kind: dynamic_topk."""
    top_k: ExpertCount
    """Experts per ordinary token."""
    tail_top_k: ExpertCount
    """Experts per tail token (LTDR: 4 of 4 experts, 12 of 64)."""
    normalize: bool = False
    """Renormalise each token's weights to sum to 1."""
    scale: PositiveFloat = 1.0
    """Scaling factor applied to the weights."""
    dtype: RouterDtype = "float32"
    """Precision of the router logits."""

    @model_validator(mode="after")
    def _tail_at_least_top_k(self):
        if self.tail_top_k < self.top_k:
            raise ValueError(f"tail_top_k ({self.tail_top_k}) must be >= top_k ({self.top_k})")
        return self

    def experts_per_token(self, num_experts: int) -> int:
        return self.tail_top_k

    def compares_tokens(self) -> str | None:
        return "a token is a tail token by comparison with the mean over the route's tokens of the call"


class DenseRouterSpec(RouterSpecBase):
    """Every token to every expert of the pool (shared experts), with weight 1 or a sigmoid gate."""

    model_config = example({"type": "dense", "gate": "sigmoid"})

    type: Literal["dense"]
    """Selects this kind: dense."""
    gate: Literal["none", "sigmoid"] = "none"
    """none = weight 1; sigmoid = weight sigmoid(x . w) per token, one learned w [hidden] (Qwen2-MoE shared_expert_gate)."""

    def params(self, num_experts: int, hidden: int) -> int:
        return hidden if self.gate == "sigmoid" else 0

    def experts_per_token(self, num_experts: int) -> int:
        return num_experts


RouterSpec = Annotated[
    Union[
        TopKRouterSpec, DenseRouterSpec, DeepSpeedTop2RouterSpec, ExpertChoiceRouterSpec, SoftRouterSpec, ThresholdRouterSpec, DynamicTopKRouterSpec,
        HierarchicalRouterSpec, ModalityMixRouterSpec, ContextRouterSpec, QueryRouterSpec],
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
    causal: bool = True
    """true: on a route over text, refuse routers whose routing of a token depends on other tokens of the call (expert_choice, soft, dynamic_topk, capacity by_score or with several choices per token), which let a causal LM see later tokens in training; false: accept them here (MoE-LLaVA's DeepSpeed capacity does this)."""


class _BalancingTerm(SpecModel):
    coef: NonNegativeFloat
    """Weight of the term in the loss (summed over MoE layers)."""
    tokens: TokenSelector = "all"
    """Which tokens the statistics are taken over (padding never counts)."""


class SwitchAuxSpec(_BalancingTerm):
    """Switch aux loss E * sum_e f_e * P_e, f_e = share of tokens whose top-1 is e; 1.0 when balanced."""

    type: Literal["switch_aux"]
    """Selects this kind: switch_aux."""


class LoadBalanceSpec(_BalancingTerm):
    """GShard/Mixtral load balance E * sum_e f_e * P_e, f_e = share of the top-k assignments; 1.0 when balanced."""

    type: Literal["load_balance"]
    """Selects this kind: load_balance."""


class ZLossSpec(_BalancingTerm):
    """Router z-loss mean(logsumexp(logits)^2) (ST-MoE): keeps router logits small."""

    type: Literal["z_loss"]
    """Selects this kind: z_loss."""
    coef: NonNegativeFloat = 0.001
    """Weight of the term in the loss (summed over MoE layers)."""


class SeqAuxSpec(_BalancingTerm):
    """DeepSeek sequence-wise balance loss: per sequence sum_e f_e * P_e (f_e = E * share of the sequence's assignments, P_e = mean normalised score), averaged over sequences; 1.0 when balanced."""

    type: Literal["seq_aux"]
    """Selects this kind: seq_aux."""


class EntropySpec(_BalancingTerm):
    """Mean entropy of each token's normalised router scores; with coef > 0 it sharpens routing."""

    type: Literal["entropy"]
    """Selects this kind: entropy."""


class AuxFreeBiasSpec(SpecModel):
    """Aux-loss-free balancing (DeepSeek-V3): after each optimiser step (model.update_balancing() or BalancingCallback), every router with bias: true moves its correction bias by rate * sign(mean load - load_e). Adds nothing to the loss."""

    type: Literal["aux_free_bias"]
    """Selects this kind: aux_free_bias."""
    rate: PositiveFloat = 0.001
    """Update speed gamma."""
    tokens: TokenSelector = "all"
    """Which tokens the loads are counted over (padding never counts)."""


BalancingSpec = Annotated[Union[SwitchAuxSpec, LoadBalanceSpec, SeqAuxSpec, EntropySpec, ZLossSpec, AuxFreeBiasSpec], Field(discriminator="type")]


class DispatchSpec(SpecModel):
    """How tokens reach their experts' weights."""

    backend: Literal["auto", "triton", "torch", "eager"] = "auto"
    """auto = the sort-based torch path (Triton becomes the CUDA default once verified on a GPU); triton = the Triton kernels, opt-in; eager = the per-expert reference loop."""


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

    @model_validator(mode="after")
    def _aux_free_bias_needs_a_bias(self):
        bias_terms = [term for term in self.balancing if term.type == "aux_free_bias"]
        if len(bias_terms) > 1:
            raise ValueError("at most one aux_free_bias term")
        rates = {rate for rate, _ in self.router_bias_updates()}
        if rates and bias_terms:
            raise ValueError("give the bias update rate once: bias: {update_rate} on routers, or an aux_free_bias term")
        if bias_terms and not any(getattr(route.router, "bias", False) is True for route in self.routes):
            raise ValueError("aux_free_bias needs a route whose router has bias: true")
        if len(rates) > 1:
            raise ValueError(f"routers' bias update_rate values must agree, got {sorted(rates)}")
        return self

    def router_bias_updates(self) -> list[tuple[float, str]]:
        """(update rate, route tokens) of every router spelling its own bias update, `bias: {update_rate}`."""
        return [(route.router.bias.update_rate, route.tokens) for route in self.routes
                if isinstance(getattr(route.router, "bias", None), CorrectionBiasSpec)]


def moe_layer_indices(layers: LayerPattern, num_layers: int) -> list[int]:
    """The decoder layers a layer pattern turns into MoE layers."""
    if isinstance(layers, list):
        return sorted(set(layers))
    if isinstance(layers, FirstKDenseSpec):
        return list(range(layers.first_k_dense, num_layers))
    return {
        "all": list(range(num_layers)),
        "every_other": list(range(0, num_layers, 2)),
        "first_half": list(range(num_layers // 2)),
        "second_half": list(range(num_layers // 2, num_layers)),
    }[layers]
