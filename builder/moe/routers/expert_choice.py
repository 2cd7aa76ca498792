"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Token-to-expert scores are softmaxed over experts; then each expert takes the C tokens with its
highest scores, C = ceil(n * capacity_factor / E) with n the route's non-padding tokens in this
call (padding is never picked). A token may be picked by several experts or by none (then only
its residual passes). Its gate weight for an expert is its score. Load is balanced by
construction, so balancing terms skip this router.

Causality: an expert's choice compares all tokens of the call, later positions included, so a
token's routing depends on tokens after it, and a KV-cache decoding step (one new token per
sequence) routes differently from the full-sequence forward. This is the method as published (for
encoders and for training); use a token-choice router where generation must match training.

Output slots: K = E, slot e holds expert e when it picked the token, else -1.
Legend: T tokens, D hidden, E experts, C tokens per expert.
"""

import math

import torch

from moebuild.moe.batch import RouteBatch
from moebuild.moe.routers.base import DTYPES, LinearRouter, Routing


class ExpertChoiceRouter(LinearRouter):
    balanced = False

    def __init__(self, hidden_size: int, num_experts: int, capacity_factor: float = 2.0, **linear):
        super().__init__(hidden_size, num_experts, **linear)
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.num_experts, self.capacity_factor = num_experts, capacity_factor

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "ExpertChoiceRouter":
        return cls(hidden_size, num_experts, node.capacity_factor, router_dtype=DTYPES[node.dtype])

    def forward(self, batch: RouteBatch) -> Routing:
        x_TD, valid_T = batch.x_RD, batch.valid_R
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        n = int(valid_T.sum())
        capacity = min(math.ceil(n * self.capacity_factor / E), n)
        scores_ET = probs_TE.t().masked_fill(~valid_T, float("-inf"))
        picked_ET = torch.zeros_like(scores_ET, dtype=torch.bool)
        picked_ET.scatter_(1, scores_ET.topk(capacity, dim=-1).indices, True)
        picked_TE = picked_ET.t()
        ids_TE = torch.arange(E, device=x_TD.device).expand(T, E).masked_fill(~picked_TE, -1)
        return Routing(probs_TE * picked_TE, ids_TE, ids_TE, logits_TE, probs_TE, capacity)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor}"
