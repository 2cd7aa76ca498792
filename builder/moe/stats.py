"""Routing statistics of one route, per modality: what `output_router_stats=True` returns.

For the route's non-padding tokens, overall ("all") and per modality the route admits ("text",
"image"): `tokens` (int64), `load` (int64 kept assignments per expert), `dropped_fraction`
(selected slots dropped by capacity / selected slots), `experts_per_token` (mean kept experts),
`entropy` (mean entropy of the normalised router scores, when the router has scores) and
`tail_share` (share of LTDR tail tokens, dynamic_topk only). Counts are int64 and fractions fp32,
never fp16 (megablocks overflowed past 65,504 tokens per expert).

Legend: R tokens of one route, E experts, K slots per token.
"""

import torch
from torch import Tensor

from moebuild.moe.batch import IMAGE, TEXT
from moebuild.moe.routers.base import Routing

MODALITIES = {"text": TEXT, "image": IMAGE}


def _group_stats(routing: Routing, num_experts: int, mask_R: Tensor) -> dict[str, Tensor]:
    ids_RK, topk_RK = routing.ids_TK[mask_R], routing.topk_ids_TK[mask_R]
    kept_RK = ids_RK >= 0
    n = mask_R.sum()
    stats = {
        "tokens": n,
        "load": torch.bincount(ids_RK[kept_RK], minlength=num_experts),
        "dropped_fraction": ((topk_RK >= 0) & ~kept_RK).sum() / (topk_RK >= 0).sum().clamp_min(1),
        "experts_per_token": kept_RK.sum() / n.clamp_min(1),
    }
    if routing.probs_TE is not None:
        p_RE = routing.probs_TE[mask_R].float()
        p_RE = p_RE / p_RE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        h_R = -(p_RE * p_RE.clamp_min(1e-20).log()).sum(dim=-1)
        stats["entropy"] = h_R.sum() / n.clamp_min(1)
    if routing.tail_T is not None:
        stats["tail_share"] = routing.tail_T[mask_R].sum() / n.clamp_min(1)
    return stats


@torch.no_grad()
def route_stats(routing: Routing, num_experts: int, valid_R: Tensor, modality_R: Tensor, tokens: str) -> dict:
    """{"all": stats, and "text" / "image" where the route's selector `tokens` admits them}."""
    out = {"all": _group_stats(routing, num_experts, valid_R)}
    for name, code in MODALITIES.items():
        if tokens in ("all", name):
            out[name] = _group_stats(routing, num_experts, valid_R & (modality_R == code))
    return out
