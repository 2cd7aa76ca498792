"""Routers that give tokens a varying number of experts.

`ThresholdRouter` is top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
Routing in MoE Models"): each token takes the smallest set of its highest-probability experts
whose softmax mass reaches p, at most `max_experts`.
`DynamicTopKRouter` is LTDR's vision routing (Cai et al. 2025, "Long-Tailed Distribution-Aware
Router"): a token's routing-probability variance (RPV, the variance of its softmax probabilities
across experts) above the mean RPV of its group -- the route's non-padding tokens in this call --
makes it a tail token (under expert parallelism the mean is over every rank's tokens), routed to `tail_top_k` experts; the others take `top_k`. It holds at
inference too. The variance is the population variance; the unbiased one is a constant multiple
of it and selects the same tokens.

Both fill K = the most experts a token can take; unused slots have id -1 and weight 0.
Legend: T tokens, D hidden, E experts, K slots per token.
"""

import torch
from torch import Tensor

from moebuild.moe.batch import RouteBatch
from moebuild.moe.routers.base import DTYPES, LinearRouter, Routing


def masked_weights(probs_TE: Tensor, ids_TK: Tensor, keep_TK: Tensor, normalize: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(ids with unused slots -1, their probabilities, renormalised over the kept slots if asked, x scale)."""
    weights_TK = probs_TE.gather(1, ids_TK) * keep_TK
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return ids_TK.masked_fill(~keep_TK, -1), weights_TK * scale


class ThresholdRouter(LinearRouter):
    balanced = True

    def __init__(self, hidden_size: int, num_experts: int, threshold: float, max_experts: int,
                 normalize: bool = False, scale: float = 1.0, **linear):
        super().__init__(hidden_size, num_experts, **linear)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if not 1 <= max_experts <= num_experts:
            raise ValueError(f"max_experts must be in [1, {num_experts}], got {max_experts}")
        self.num_experts, self.threshold, self.max_experts = num_experts, threshold, max_experts
        self.normalize, self.scale = normalize, scale

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "ThresholdRouter":
        return cls(hidden_size, num_experts, node.threshold, node.max_experts, normalize=node.normalize,
                   scale=node.scale, router_dtype=DTYPES[node.dtype])

    def forward(self, batch: RouteBatch) -> Routing:
        logits_TE = self.logits(batch.x_RD)
        probs_TE = logits_TE.softmax(dim=-1)
        sorted_TK, ids_TK = probs_TE.topk(self.max_experts, dim=-1)
        mass_before_TK = sorted_TK.cumsum(dim=-1) - sorted_TK
        keep_TK = mass_before_TK < self.threshold  # the first expert always; then until mass >= p
        ids_TK, weights_TK = masked_weights(probs_TE, ids_TK, keep_TK, self.normalize, self.scale)
        return Routing(weights_TK, ids_TK, ids_TK, logits_TE, probs_TE)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, threshold={self.threshold}, max_experts={self.max_experts}"


class DynamicTopKRouter(LinearRouter):
    balanced = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, tail_top_k: int,
                 normalize: bool = False, scale: float = 1.0, **linear):
        super().__init__(hidden_size, num_experts, **linear)
        if not 1 <= top_k <= tail_top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= tail_top_k <= {num_experts}, got {top_k}, {tail_top_k}")
        self.num_experts, self.top_k, self.tail_top_k = num_experts, top_k, tail_top_k
        self.normalize, self.scale = normalize, scale

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "DynamicTopKRouter":
        return cls(hidden_size, num_experts, node.top_k, node.tail_top_k, normalize=node.normalize,
                   scale=node.scale, router_dtype=DTYPES[node.dtype])

    def forward(self, batch: RouteBatch) -> Routing:
        x_TD, valid_T = batch.x_RD, batch.valid_R
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        # population variance across experts, written out: torch.var warns on an empty route (decode)
        rpv_T = (probs_TE - probs_TE.mean(dim=-1, keepdim=True)).square().mean(dim=-1)
        # over every rank's tokens under expert parallelism (the threshold is a batch statistic)
        mean_rpv = batch.reduce((rpv_T.detach() * valid_T).sum()) / batch.reduce(valid_T.sum()).clamp_min(1)
        tail_T = (rpv_T > mean_rpv) & valid_T
        k_T = torch.where(tail_T, self.tail_top_k, self.top_k)
        ids_TK = probs_TE.topk(self.tail_top_k, dim=-1).indices
        keep_TK = torch.arange(self.tail_top_k, device=x_TD.device) < k_T[:, None]
        ids_TK, weights_TK = masked_weights(probs_TE, ids_TK, keep_TK, self.normalize, self.scale)
        return Routing(weights_TK, ids_TK, ids_TK, logits_TE, probs_TE, tail_T=tail_T)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, tail_top_k={self.tail_top_k}"
