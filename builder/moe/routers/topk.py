"""Token-choice top-k routing and the dense router of shared experts.

`TopKRouter` is token-choice top-k as in Switch Transformer (Fedus et al. 2021), GShard (Lepikhin
et al. 2020) and Mixtral, in transformers' Mixtral layout (a bias-free `weight` [E, D]), with the
DeepSeek-V3 options (transformers `DeepseekV3TopkRouter` / `DeepseekV3MoE.route_tokens_to_experts`):
- order: "softmax_topk" takes the k best of the scores over all E experts (Mixtral, DeepSeek);
  "topk_softmax" takes the k best logits and softmaxes over those k only. They differ unless the
  k weights are renormalised (transformers #27942), so the spec says which.
- a correction bias (`e_score_correction_bias`, a buffer) added to the scores for selection only;
  weights always come from the unbiased scores (transformers #41647). Aux-loss-free balancing
  (Wang et al. 2024) updates it after each optimiser step through `update_balancing`.
- group-limited selection: experts split into num_groups groups, a group ranked by the sum of its
  two best (biased) expert scores (V3 noaux_tc) or by its best (V2 group_limited_greedy); the
  other groups' scores become 0.0 (DeepSeek-V2 / VL2 code) or -inf (transformers' DeepseekV3).
- noise on the selection in training (Gaussian or Gumbel on the logits, multiplicative jitter on
  the input as in Switch), expert dropout (each token-expert pair unselectable with probability p
  in training), and a top-k curriculum: k = min(top_k, start_k + step // steps_per_k), the step
  counted by `update_balancing`, never in forward.
- the routed scaling factor multiplies the weights whether or not they are renormalised
  (sglang-jax #1282).
`DenseRouter` sends every token to every expert: DeepSeek-MoE's shared experts; `gate="sigmoid"`
weights them by sigmoid(x . w) as Qwen2-MoE's `shared_expert_gate`.

Legend: T tokens, D hidden, E experts, G groups, K slots per token.
"""

import torch
from torch import Tensor, nn

from moebuild.moe.batch import RouteBatch
from moebuild.moe.routers.base import (
    DTYPES,
    SCORES,
    Capacity,
    LinearRouter,
    Router,
    Routing,
    check_choice,
    gumbel_like,
    router_logits,
)

DEFAULT_NOISE_STD = {"gaussian": 1.0, "jitter": 0.01}
ORDERS = ("softmax_topk", "topk_softmax")


GROUP_RANKS = {  # how a group of experts is ranked, from its experts' (biased) selection scores
    "top2_sum": lambda scores_TGN: scores_TGN.topk(min(2, scores_TGN.shape[-1]), dim=-1).values.sum(dim=-1),
    "max": lambda scores_TGN: scores_TGN.amax(dim=-1),
}


DROPPED_SCORES = {"zero": 0.0, "-inf": float("-inf")}


def group_limited(selection_TE: Tensor, num_groups: int, top_groups: int,
                  rank_by: str = "top2_sum", dropped_score: str = "zero") -> tuple[Tensor, Tensor]:
    """(scores, kept_TE): scores outside each token's top_groups groups set to `dropped_score`.
    "zero" is DeepSeek's own code (V3 noaux_tc: `masked_fill(~score_mask, 0.0)`; V2
    group_limited_greedy and DeepSeek-VL2 the same): where biased scores are negative, an expert of a
    dropped group can win. "-inf" is transformers' DeepseekV3TopkRouter. `kept_TE`: the experts of
    the kept groups."""
    T, E = selection_TE.shape
    grouped_TGN = selection_TE.view(T, num_groups, E // num_groups)
    group_scores_TG = GROUP_RANKS[rank_by](grouped_TGN)
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_scores_TG.topk(top_groups, dim=-1).indices, True)
    kept_TE = keep_TG[..., None].expand_as(grouped_TGN).reshape(T, E)
    return selection_TE.masked_fill(~kept_TE, DROPPED_SCORES[dropped_score]), kept_TE


class TopKRouter(LinearRouter):
    zero_init = ("e_score_correction_bias", "pending_load_E", "step")
    fp32_buffers = ("e_score_correction_bias", "pending_load_E")

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        score: str = "softmax",
        order: str = "softmax_topk",
        normalize: bool = False,
        scale: float = 1.0,
        noise: str | None = None,
        noise_std: float | None = None,
        capacity: Capacity | None = None,
        num_groups: int = 1,
        top_groups: int = 1,
        group_rank: str = "top2_sum",
        dropped_score: str = "zero",
        correction_bias: bool = False,
        expert_dropout: float = 0.0,
        curriculum: tuple[int, int] | None = None,
        router_dtype: torch.dtype = torch.float32,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """noise (training only): "gaussian" adds N(0, noise_std^2) (default std 1.0) and "gumbel"
        Gumbel(0, 1) to the logits used for selection; "jitter" multiplies the input by
        U(1 - noise_std, 1 + noise_std), default 0.01. curriculum: (start_k, steps_per_k)."""
        super().__init__(hidden_size, num_experts, router_dtype, init_std, device, dtype)
        check_choice("score", score, SCORES)
        check_choice("order", order, ORDERS)
        check_choice("noise", noise, (None, "gaussian", "gumbel", "jitter"))
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        if order == "topk_softmax" and score != "softmax":
            raise ValueError("order 'topk_softmax' needs score 'softmax'")
        if num_experts % num_groups or not 1 <= top_groups <= num_groups or top_k > top_groups * (num_experts // num_groups):
            raise ValueError(f"groups: {num_experts} experts in {num_groups} groups, keep {top_groups}, for top_k {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.score, self.order, self.normalize, self.scale = score, order, normalize, scale
        self.noise = noise
        self.noise_std = noise_std if noise_std is not None else DEFAULT_NOISE_STD.get(noise)
        self.capacity = capacity
        self.has_correction_bias = correction_bias
        check_choice("group rank", group_rank, GROUP_RANKS)
        check_choice("dropped score", dropped_score, DROPPED_SCORES)
        self.num_groups, self.top_groups, self.group_rank = num_groups, top_groups, group_rank
        self.dropped_score = dropped_score
        self.expert_dropout = expert_dropout
        self.curriculum = curriculum
        if correction_bias:  # buffers: not trained by the optimiser, not counted as parameters
            fp32 = {"device": device, "dtype": torch.float32}
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, **fp32))
            # selections counted in training forwards since the last update_balancing
            self.register_buffer("pending_load_E", torch.zeros(num_experts, **fp32), persistent=False)
        if curriculum is not None:
            self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "TopKRouter":
        noise = None if node.noise is None or node.noise.type == "none" else node.noise
        groups, curriculum = node.groups, node.curriculum
        return cls(
            hidden_size,
            num_experts,
            node.top_k,
            score=node.score,
            order=node.order,
            normalize=node.normalize,
            scale=node.scale,
            noise=None if noise is None else noise.type,
            noise_std=None if noise is None else noise.std,
            capacity=Capacity.from_spec(node.capacity),
            num_groups=groups.num_groups if groups else 1,
            top_groups=groups.top_groups if groups else 1,
            group_rank=groups.rank_by if groups else "top2_sum",
            dropped_score=groups.dropped_score if groups else "zero",
            correction_bias=bool(node.bias),
            expert_dropout=node.expert_dropout,
            curriculum=(curriculum.start_k, curriculum.steps_per_k) if curriculum else None,
            router_dtype=DTYPES[node.dtype],
        )

    def current_k(self) -> int:
        if self.curriculum is None:
            return self.top_k
        start_k, steps_per_k = self.curriculum
        return min(self.top_k, start_k + int(self.step) // steps_per_k)

    def selection_scores(self, logits_TE: Tensor, probs_TE: Tensor) -> Tensor:
        """What top-k is taken over: scores of the (noisy) logits, + bias, group-limited, dropped out.
        `probs_TE` are the scores of the clean logits, reused when no noise is drawn."""
        selection_TE = probs_TE
        if self.training and self.noise == "gaussian":
            selection_TE = SCORES[self.score](logits_TE + torch.randn_like(logits_TE) * self.noise_std)
        elif self.training and self.noise == "gumbel":
            selection_TE = SCORES[self.score](logits_TE + gumbel_like(logits_TE))
        if self.has_correction_bias:
            selection_TE = selection_TE + self.e_score_correction_bias
        kept_TE = None
        if self.num_groups > 1:
            selection_TE, kept_TE = group_limited(selection_TE, self.num_groups, self.top_groups, self.group_rank,
                                                 self.dropped_score)
        if self.training and self.expert_dropout > 0:
            drop_TE = torch.rand_like(selection_TE) < self.expert_dropout
            if kept_TE is not None:  # a dropped-out expert is never replaced by one of a dropped group
                drop_TE |= ~kept_TE
            selection_TE = selection_TE.masked_fill(drop_TE, float("-inf"))
        return selection_TE

    def gate_weights(self, logits_TE: Tensor, probs_TE: Tensor, ids_TK: Tensor, empty_TK: Tensor | None,
                     selected_TK: Tensor | None) -> Tensor:
        """The K gate weights. `empty_TK`: slots left without an expert (None: there are none);
        `selected_TK`: the top-k values when the selection was the scores themselves, which are then
        the weights of "softmax_topk" as they are (no gather)."""
        safe_TK = ids_TK if empty_TK is None else ids_TK.clamp_min(0)
        if self.order == "topk_softmax":
            logits_TK = logits_TE.gather(1, safe_TK)
            weights_TK = (logits_TK if empty_TK is None else logits_TK.masked_fill(empty_TK, float("-inf"))).softmax(-1)
        else:
            weights_TK = selected_TK if selected_TK is not None else probs_TE.gather(1, safe_TK)
        if empty_TK is not None:
            weights_TK = weights_TK.masked_fill(empty_TK, 0.0)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return weights_TK * self.scale if self.scale != 1.0 else weights_TK

    def forward(self, batch: RouteBatch) -> Routing:
        x_TD = batch.x_RD
        if self.training and self.noise == "jitter":
            eps = self.noise_std
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = self.logits(x_TD)
        probs_TE = SCORES[self.score](logits_TE)
        k = self.current_k()
        selection_TE = self.selection_scores(logits_TE, probs_TE)
        values_TK, topk_ids_TK = selection_TE.topk(k, dim=-1)
        empty_TK = None
        if self.training and self.expert_dropout > 0:  # may leave fewer than k selectable (groups never do)
            empty_TK = values_TK == float("-inf")
            topk_ids_TK = topk_ids_TK.masked_fill(empty_TK, -1)
        weights_TK = self.gate_weights(logits_TE, probs_TE, topk_ids_TK, empty_TK,
                                       values_TK if selection_TE is probs_TE else None)
        ids_TK, capacity = topk_ids_TK, None
        if self.capacity is not None:
            ids_TK, weights_TK, capacity = self.capacity.apply(topk_ids_TK, weights_TK, self.num_experts, k,
                                                               batch.valid_R, self.training)
        return Routing(weights_TK, ids_TK, topk_ids_TK, logits_TE, probs_TE, capacity)

    @torch.no_grad()
    def count_load(self, ids_TK: Tensor) -> None:
        """Add a training forward's selections to the load the next bias update reads."""
        ids_N = ids_TK[ids_TK >= 0]
        self.pending_load_E.index_add_(0, ids_N, torch.ones_like(ids_N, dtype=torch.float32))

    @torch.no_grad()
    def update_balancing(self, bias_rate: float = 0.0) -> None:
        """After an optimiser step: b_e += rate * sign(mean load - load_e) (no load counted: no move);
        advance the curriculum."""
        if self.has_correction_bias:
            load_E = self.pending_load_E
            self.e_score_correction_bias += bias_rate * torch.sign(load_E.mean() - load_E)
            load_E.zero_()
        if self.curriculum is not None:
            self.step += 1

    def extra_repr(self) -> str:
        capacity = self.capacity
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, order={self.order!r}, "
            f"normalize={self.normalize}, scale={self.scale}, noise={self.noise!r}, groups=({self.num_groups}, "
            f"{self.top_groups}), correction_bias={self.has_correction_bias}, capacity={capacity}"
        )


class DenseRouter(Router):
    balanced = False

    def __init__(
        self,
        num_experts: int,
        hidden_size: int | None = None,
        gate: str = "none",
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_choice("gate", gate, ("none", "sigmoid"))
        self.num_experts, self.gate, self.init_std = num_experts, gate, init_std
        if gate == "sigmoid":
            if hidden_size is None:
                raise ValueError("a sigmoid gate needs hidden_size")
            self.weight = nn.Parameter(torch.empty(1, hidden_size, device=device, dtype=dtype))
            self.reset_parameters()

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "DenseRouter":
        return cls(num_experts, hidden_size, gate=node.gate)

    def forward(self, batch: RouteBatch) -> Routing:
        x_TD = batch.x_RD
        T, E = x_TD.shape[0], self.num_experts
        ids_TK = torch.arange(E, device=x_TD.device).expand(T, E)
        if self.gate == "sigmoid":
            weights_TK = torch.sigmoid(router_logits(x_TD, self.weight, torch.float32)).expand(T, E)
        else:
            weights_TK = torch.ones(T, E, device=x_TD.device)
        return Routing(weights_TK, ids_TK, ids_TK, dense=True)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, gate={self.gate!r}"
