"""Two-level routers over named groups of one pool's experts (e.g. an image group and a text group).

`HierarchicalRouter` is the hierarchical mixture of experts (Jordan & Jacobs 1994), sparse at
both levels as in Shazeer et al. 2017 (appendix B): a gate over groups keeps each token's
`top_groups` groups, then a gate inside each kept group keeps its `top_k` experts. A token's
weight for expert e of group g is p(g | x) * p(e | x, g), with p(g | x) the softmax over groups
and p(e | x, g) the softmax over g's experts only; VL-MoE's modality experts (Shen et al. 2023,
arXiv:2303.07226) are the groups a first stage learns to choose between.
`ModalityMixRouter` is soft modality mixing: every group is used, and p(g | x) is replaced by a
learned softmax per token modality, p(g | m) (uniform at init; hard modality routing is its
one-hot limit).

Both return the joint scores p(g) p(e | g) over all E experts as `probs_TE` (summing to 1, so
the switch/load-balance terms apply) and the in-group expert logits as `logits_TE` (z-loss).
Slots are ordered by group rank, then expert rank; routing is dropless.

Legend: T tokens, D hidden, E experts, G groups, K slots per token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moebuild.moe.batch import RouteBatch
from moebuild.moe.routers.base import Router, Routing


def _group_sizes(node, num_experts: int) -> list[int]:
    sizes = list(node.groups.values())
    if sum(sizes) != num_experts:
        raise ValueError(f"{node.type} groups {node.groups} hold {sum(sizes)} experts, the pool has {num_experts}")
    return sizes


class _TwoLevelRouter(Router):
    def __init__(self, hidden_size: int, group_sizes: list[int], top_k: int, normalize: bool = False,
                 init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        if len(group_sizes) < 2 or not 1 <= top_k <= min(group_sizes):
            raise ValueError(f"need >= 2 groups and 1 <= top_k <= the smallest group, got {group_sizes}, top_k={top_k}")
        self.group_sizes, self.top_k, self.normalize = list(group_sizes), top_k, normalize
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(sum(group_sizes), hidden_size, device=device, dtype=dtype))

    @property
    def num_experts(self) -> int:
        return sum(self.group_sizes)

    def _route_groups(self, x_TD: Tensor, group_probs_TG: Tensor, groups_TH: Tensor) -> Routing:
        """Top-k inside each group, then keep the H groups in `groups_TH`; weight p(g) * p(e | g)."""
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        starts = [0, *torch.tensor(self.group_sizes).cumsum(0).tolist()]
        in_group = [logits_TE[:, a:b].softmax(dim=-1) for a, b in zip(starts, starts[1:])]
        top = [p_TN.topk(self.top_k, dim=-1) for p_TN in in_group]
        ids_TGK = torch.stack([t.indices + a for t, a in zip(top, starts)], dim=1)
        probs_TGK = torch.stack([t.values for t in top], dim=1)
        pick = groups_TH[:, :, None].expand(-1, -1, self.top_k)
        weights_TK = (group_probs_TG.gather(1, groups_TH)[:, :, None] * probs_TGK.gather(1, pick)).flatten(1)
        ids_TK = ids_TGK.gather(1, pick).flatten(1)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        sizes = torch.tensor(self.group_sizes, device=x_TD.device)
        probs_TE = group_probs_TG.repeat_interleave(sizes, dim=1) * torch.cat(in_group, dim=1)
        return Routing(weights_TK=weights_TK, ids_TK=ids_TK, topk_ids_TK=ids_TK, logits_TE=logits_TE, probs_TE=probs_TE)


class HierarchicalRouter(_TwoLevelRouter):
    def __init__(self, hidden_size: int, group_sizes: list[int], top_groups: int, top_k: int,
                 normalize: bool = False, init_std: float = 0.02, device=None, dtype=None):
        super().__init__(hidden_size, group_sizes, top_k, normalize, init_std, device, dtype)
        if not 1 <= top_groups <= len(group_sizes):
            raise ValueError(f"top_groups must be in [1, {len(group_sizes)}], got {top_groups}")
        self.top_groups = top_groups
        self.group_weight = nn.Parameter(torch.empty(len(group_sizes), hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "HierarchicalRouter":
        return cls(hidden_size, _group_sizes(node, num_experts), node.top_groups, node.top_k, normalize=node.normalize)

    def forward(self, batch: RouteBatch) -> Routing:
        x_TD = batch.x_RD
        group_probs_TG = F.linear(x_TD.float(), self.group_weight.float()).softmax(dim=-1)
        groups_TH = group_probs_TG.topk(self.top_groups, dim=-1).indices
        return self._route_groups(x_TD, group_probs_TG, groups_TH)

    def extra_repr(self) -> str:
        return f"group_sizes={self.group_sizes}, top_groups={self.top_groups}, top_k={self.top_k}, normalize={self.normalize}"


class ModalityMixRouter(_TwoLevelRouter):
    zero_init = ("modality_logits",)  # every group equally weighted until trained

    def __init__(self, hidden_size: int, group_sizes: list[int], top_k: int, normalize: bool = False,
                 num_modalities: int = 2, init_std: float = 0.02, device=None, dtype=None):
        super().__init__(hidden_size, group_sizes, top_k, normalize, init_std, device, dtype)
        self.modality_logits = nn.Parameter(torch.empty(num_modalities, len(group_sizes), device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "ModalityMixRouter":
        return cls(hidden_size, _group_sizes(node, num_experts), node.top_k, normalize=node.normalize)

    def forward(self, batch: RouteBatch) -> Routing:
        x_TD = batch.x_RD
        group_probs_TG = self.modality_logits.float().softmax(dim=-1)[batch.modality_R]
        every_group_TG = torch.arange(len(self.group_sizes), device=x_TD.device).expand(x_TD.shape[0], -1)
        return self._route_groups(x_TD, group_probs_TG, every_group_TG)

    def extra_repr(self) -> str:
        return f"group_sizes={self.group_sizes}, top_k={self.top_k}, normalize={self.normalize}"
