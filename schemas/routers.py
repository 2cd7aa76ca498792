"""Router types of the routing graph: each a Pydantic class with a `type` literal, an example, and
the torch-free facts about itself (`params`, `experts_per_token`, `compares_tokens`; see
`base.RouterSpecBase`). `RouterSpec` is their union.

Token-choice top-k follows Switch/GShard gating (Fedus et al. 2021; Lepikhin et al. 2020) with the
DeepSeek-V3 options (correction bias, group-limited selection); `dense` gates DeepSeekMoE's and
Qwen2-MoE's shared experts (Dai et al. 2024); `deepspeed_top2` is MoE-LLaVA's gate; expert choice,
Soft MoE, top-p and LTDR's dynamic top-k compare tokens or vary the experts per token. The
modality-aware routers:

- `hierarchical`: a first gate picks groups of a pool's experts, a second picks experts inside
  each chosen group, weight = p(group) * p(expert | group): the hierarchical mixture of experts
  (Jordan & Jacobs 1994; Shazeer et al. 2017, sec. B) with modality groups as in VL-MoE's vision /
  language experts (Shen et al. 2023, arXiv:2303.07226).
- `modality_mix`: soft modality mixing, every group used, each token's group weights a learned
  softmax per token modality (hard VL-MoE routing is the limit of one-hot weights).
- `context`: top-k over [x, mean of the token's graph neighbours] (image patches on their 2-D
  grid, text as a causal chain), aggregated by torch-geometric message passing.
- `query`: top-k over [x, mean of the preceding text of the token's sequence]: image tokens
  routed conditioned on the prompt text (query-dependent gating).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import Field, PositiveFloat, model_validator

from moebuild.schemas.base import ExpertCount, RouterSpecBase, SpecModel, example, up_to

MAX_CAPACITY_FACTOR = 64.0


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
    the best top_groups groups per token are selectable (the others' scores become `dropped_score`)."""

    num_groups: ExpertCount
    """Number of expert groups (must divide the pool's num_experts)."""
    top_groups: ExpertCount
    """Groups kept per token."""
    rank_by: Literal["top2_sum", "max"] = "top2_sum"
    """How a group is ranked: top2_sum = the sum of its two best (biased) expert scores (DeepSeek-V3 noaux_tc); max = its best expert score (DeepSeek-V2 group_limited_greedy)."""
    dropped_score: Literal["zero", "-inf"] = "zero"
    """The selection score of a dropped group's experts: zero = 0.0, as DeepSeek-V2's and DeepSeek-VL2's code (an expert of a dropped group can still win where biased scores are negative); -inf = never selectable, as transformers' DeepseekV3 and DeepSeek-V3's inference code."""

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


ExpertGroups = dict[str, ExpertCount]
"""Named groups of consecutive experts of the route's pool, in order, sizes summing to its num_experts."""


class _Grouped(RouterSpecBase):
    groups: ExpertGroups = Field(min_length=2)
    """Named groups of consecutive experts of the pool, e.g. {image: 4, text: 4}; sizes sum to the pool's num_experts."""
    top_k: ExpertCount = 1
    """Experts chosen inside each chosen group."""
    normalize: bool = False
    """Renormalise each token's weights (over every chosen expert) to sum to 1."""

    @model_validator(mode="after")
    def _top_k_fits_every_group(self):
        smallest = min(self.groups.values())
        if self.top_k > smallest:
            raise ValueError(f"top_k ({self.top_k}) must be <= the smallest group's size ({smallest})")
        return self


class HierarchicalRouterSpec(_Grouped):
    """Two-level routing: a gate over groups picks `top_groups`, then top-k experts inside each."""

    model_config = example({"type": "hierarchical", "groups": {"image": 2, "text": 2}, "top_groups": 1, "top_k": 2})

    type: Literal["hierarchical"]
    """Selects this kind: hierarchical."""
    top_groups: ExpertCount = 1
    """Groups chosen per token by the first gate (softmax over groups)."""

    @model_validator(mode="after")
    def _top_groups_fit(self):
        if self.top_groups > len(self.groups):
            raise ValueError(f"top_groups ({self.top_groups}) must be <= the number of groups ({len(self.groups)})")
        return self

    def params(self, num_experts: int, hidden: int) -> int:
        return (num_experts + len(self.groups)) * hidden  # expert gate and group gate

    def experts_per_token(self, num_experts: int) -> int:
        return self.top_groups * self.top_k


class ModalityMixRouterSpec(_Grouped):
    """Soft modality mixing: every group, weighted by a learned softmax over groups per token modality."""

    model_config = example({"type": "modality_mix", "groups": {"image": 2, "text": 2}, "top_k": 1})

    type: Literal["modality_mix"]
    """Selects this kind: modality_mix."""

    def params(self, num_experts: int, hidden: int) -> int:
        return num_experts * hidden + 2 * len(self.groups)  # expert gate, group logits per modality

    def experts_per_token(self, num_experts: int) -> int:
        return len(self.groups) * self.top_k


class _FeatureTopK(RouterSpecBase):
    top_k: ExpertCount
    """Experts per token."""
    score: Literal["softmax", "sigmoid"] = "softmax"
    """Score function over all experts, applied before selection."""
    normalize: bool = False
    """Renormalise each token's k weights to sum to 1."""

    def params(self, num_experts: int, hidden: int) -> int:
        return num_experts * 2 * hidden  # the gate reads [token, context features]

    def experts_per_token(self, num_experts: int) -> int:
        return self.top_k


class ContextRouterSpec(_FeatureTopK):
    """Top-k over the token and its neighbours' mean: image patches on their grid, text as a causal chain."""

    model_config = example({"type": "context", "top_k": 2, "hops": 2})

    type: Literal["context"]
    """Selects this kind: context."""
    hops: up_to(16) = 1
    """Rounds of neighbour averaging (message passing) before the gate."""


class QueryRouterSpec(_FeatureTopK):
    """Top-k over the token and the mean of the text tokens before it in its sequence (the prompt)."""

    model_config = example({"type": "query", "top_k": 2})

    type: Literal["query"]
    """Selects this kind: query."""


RouterSpec = Annotated[
    Union[
        TopKRouterSpec, DenseRouterSpec, DeepSpeedTop2RouterSpec, ExpertChoiceRouterSpec, SoftRouterSpec, ThresholdRouterSpec, DynamicTopKRouterSpec,
        HierarchicalRouterSpec, ModalityMixRouterSpec, ContextRouterSpec, QueryRouterSpec],
    Field(discriminator="type"),
]


