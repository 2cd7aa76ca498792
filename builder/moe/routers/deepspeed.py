"""MoE-LLaVA's gate: DeepSpeed 0.9.5 `top2gating` (deepspeed/moe/sharded_moe.py), which MoE-LLaVA
(Lin et al. 2024) pins.

Softmax gates over E experts; the first expert is the argmax of the gates; the second is the
argmax of the logits plus Gumbel noise with the first excluded -- on every call, evaluation
included (only the capacity factor switches between training and evaluation). Capacity
max(ceil(2 * T * cf / E), min_capacity) over the route's real tokens (DeepSpeed counts padding
too; here padding never takes a slot); slots are filled by token position, all first choices
before any second choice; overflow is dropped. The kept gates
are renormalised, g1 / (g1 + g2) over the kept choices (a lone kept choice gets 1.0, both dropped
-> 0 and the token keeps its residual). DeepSpeed's aux loss, E * sum_e(m_e * c_e) over the top-1
choice before dropping, is the `switch_aux` balancing term (which, unlike DeepSpeed, skips padding).

Legend: T tokens, D hidden, E experts, K = 2 slots per token.
"""

import torch

from moebuild.moe.batch import RouteBatch
from moebuild.moe.routers.base import (
    DTYPES,
    Capacity,
    LinearRouter,
    Routing,
    gumbel_like,
)


class DeepSpeedTop2Router(LinearRouter):
    balanced = True

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        capacity: Capacity | None = None,
        eval_noise: bool = True,
        router_dtype: torch.dtype = torch.float32,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(hidden_size, num_experts, router_dtype, init_std, device, dtype)
        if num_experts < 2:
            raise ValueError(f"deepspeed_top2 needs at least 2 experts, got {num_experts}")
        if capacity is not None and capacity.policy != "by_position":
            raise ValueError("deepspeed_top2 drops by position (DeepSpeed's slot order)")
        self.num_experts, self.top_k, self.capacity = num_experts, 2, capacity
        self.eval_noise = eval_noise
        self.sample_gumbel = gumbel_like  # the noise source; tests put written-out noise here

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "DeepSpeedTop2Router":
        return cls(hidden_size, num_experts, Capacity.from_spec(node.capacity), eval_noise=node.eval_noise,
                   router_dtype=DTYPES[node.dtype])

    def forward(self, batch: RouteBatch) -> Routing:
        logits_TE = self.logits(batch.x_RD)
        gates_TE = logits_TE.softmax(dim=-1)
        first_T = gates_TE.argmax(dim=-1)
        if self.training or self.eval_noise:
            logits_TE_for_second = logits_TE + self.sample_gumbel(logits_TE)
        else:  # deterministic evaluation: the second-best logit
            logits_TE_for_second = logits_TE
        noisy_TE = logits_TE_for_second.scatter(1, first_T[:, None], float("-inf"))
        topk_ids_TK = torch.stack([first_T, noisy_TE.argmax(dim=-1)], dim=1)
        weights_TK = gates_TE.gather(1, topk_ids_TK)
        ids_TK, capacity = topk_ids_TK, None
        if self.capacity is not None:
            ids_TK, weights_TK, capacity = self.capacity.apply(topk_ids_TK, weights_TK, self.num_experts, 2,
                                                               batch.valid_R, self.training)
        eps = torch.finfo(weights_TK.dtype).eps  # DeepSpeed's clamp: both dropped -> 0 / eps = 0
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(eps)
        return Routing(weights_TK, ids_TK, topk_ids_TK, logits_TE, gates_TE, capacity)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, capacity={self.capacity}, eval_noise={self.eval_noise}"
