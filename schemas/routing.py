"""Modality-aware routers of the routing graph, beyond hard modality routes.

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

Imports no torch; `moe.py` puts these classes in the `RouterSpec` union.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moebuild.schemas.base import ExpertCount, RouterSpecBase, example, up_to

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
