"""Routing statistics of one route, per modality: what `output_router_stats=True` returns.

For the route's non-padding tokens, overall ("all") and per modality the route admits ("text",
"image"): `tokens` (int64), `load` (int64 kept assignments per expert), `dropped_fraction`
(selected slots dropped by capacity / selected slots), `experts_per_token` (mean kept experts),
`entropy` (mean entropy of the normalised router scores, when the router has scores) and
`tail_share` (share of LTDR tail tokens, dynamic_topk only). Counts are int64 and fractions fp32,
never fp16 (megablocks overflowed past 65,504 tokens per expert). Under expert parallelism they are
taken over every rank's tokens (one all-reduce of the sums per route and call).

Legend: R tokens of one route, E experts, K slots per token.
"""

import torch
from torch import Tensor

from moebuild.moe.batch import IMAGE, TEXT
from moebuild.moe.routers.base import Routing
from moebuild.parallel.expert import local_sum

MODALITIES = {"text": TEXT, "image": IMAGE}


def _group_sums(routing: Routing, num_experts: int, mask_R: Tensor) -> dict[str, Tensor]:
    """The sums every statistic of one group is a ratio of."""
    ids_RK, topk_RK = routing.ids_TK[mask_R], routing.topk_ids_TK[mask_R]
    kept_RK, selected_RK = ids_RK >= 0, topk_RK >= 0
    sums = {
        "tokens": mask_R.sum(),
        "load": torch.bincount(ids_RK[kept_RK], minlength=num_experts),
        "dropped": (selected_RK & ~kept_RK).sum(),
        "selected": selected_RK.sum(),
        "kept": kept_RK.sum(),
    }
    if routing.probs_TE is not None:
        p_RE = routing.probs_TE[mask_R].float()
        p_RE = p_RE / p_RE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        sums["entropy"] = -(p_RE * p_RE.clamp_min(1e-20).log()).sum(dim=-1).sum()
    if routing.tail_T is not None:
        sums["tail"] = routing.tail_T[mask_R].sum()
    return sums


def _ratios(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    n = sums["tokens"]
    stats = {
        "tokens": n,
        "load": sums["load"],
        "dropped_fraction": sums["dropped"] / sums["selected"].clamp_min(1),
        "experts_per_token": sums["kept"] / n.clamp_min(1),
    }
    if "entropy" in sums:
        stats["entropy"] = sums["entropy"] / n.clamp_min(1)
    if "tail" in sums:
        stats["tail_share"] = sums["tail"] / n.clamp_min(1)
    return stats


def _reduced(groups: dict[str, dict[str, Tensor]], reduce) -> dict[str, dict[str, Tensor]]:
    """Every sum of every group summed over the ranks in one collective (float64: exact for counts)."""
    flat = [(g, k, t) for g, sums in groups.items() for k, t in sums.items()]
    total = reduce(torch.cat([t.reshape(-1).double() for _, _, t in flat]))
    out, at = {g: {} for g in groups}, 0
    for g, k, t in flat:
        out[g][k] = total[at:at + t.numel()].view(t.shape).to(t.dtype)
        at += t.numel()
    return out


@torch.no_grad()
def route_stats(routing: Routing, num_experts: int, valid_R: Tensor, modality_R: Tensor, tokens: str,
                reduce=local_sum) -> dict:
    """{"all": stats, and "text" / "image" where the route's selector `tokens` admits them}; under
    expert parallelism (`reduce`, moe/batch.py) over every rank's tokens."""
    groups = {"all": _group_sums(routing, num_experts, valid_R)}
    for name, code in MODALITIES.items():
        if tokens in ("all", name):
            groups[name] = _group_sums(routing, num_experts, valid_R & (modality_R == code))
    if reduce is not local_sum:
        groups = _reduced(groups, reduce)
    return {name: _ratios(sums) for name, sums in groups.items()}
