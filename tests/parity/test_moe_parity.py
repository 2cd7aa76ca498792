"""MoE blocks against transformers' own modules with copied weights (fp32, max abs diff <= 1e-5):
Qwen2-MoE's sparse block with its sigmoid-gated shared expert, DeepSeek-V3's noaux_tc top-k router
and MoE block (group-limited, correction bias, normalised and scaled weights), and group-limited
selection against DeepSeek-VL2's own gate, transcribed (transformers' DeepseekV3 fills dropped
groups with -inf since 5.x; DeepSeek's code fills 0.0, which moebuild follows). Mixtral's router and
`load_balancing_loss_func` are compared in tests/builder/moe/test_balancing.py."""

import pytest
import torch
from transformers import DeepseekV3Config, Qwen2MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

import moebuild

H = 32


def copy_mlp_into_pool(pool, mlp):
    """A transformers gate/up/down MLP as expert 0 of a one-expert pool."""
    pool.gate_up_proj.data[0] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    pool.down_proj.data[0] = mlp.down_proj.weight


def copy_experts(pool, experts):
    pool.gate_up_proj.data.copy_(experts.gate_up_proj)
    pool.down_proj.data.copy_(experts.down_proj)


def randomize(module, std=0.3):
    torch.manual_seed(0)
    for p in module.parameters():
        p.data.normal_(0, std)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen2_moe_sparse_block_with_gated_shared_expert(norm_topk_prob):
    config = Qwen2MoeConfig(hidden_size=H, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            shared_expert_intermediate_size=24, norm_topk_prob=norm_topk_prob)
    theirs = Qwen2MoeSparseMoeBlock(config).eval()
    randomize(theirs)
    ours = moebuild.build_module({
        "pools": {"experts": {"num_experts": 4, "intermediate_size": 16},
                  "shared": {"num_experts": 1, "intermediate_size": 24}},
        "routes": [{"pool": "experts", "router": {"type": "topk", "top_k": 2, "normalize": norm_topk_prob}},
                   {"pool": "shared", "router": {"type": "dense", "gate": "sigmoid"}}],
    }, hidden_size=H).eval()
    ours.routes[0].router.weight.data.copy_(theirs.gate.weight)
    ours.routes[1].router.weight.data.copy_(theirs.shared_expert_gate.weight)
    copy_experts(ours.pools["experts"], theirs.experts)
    copy_mlp_into_pool(ours.pools["shared"], theirs.shared_expert)
    x_BSD = torch.randn(2, 7, H)
    with torch.no_grad():
        want = theirs(x_BSD)
        got = ours(x_BSD).hidden_states
    assert (got - want).abs().max() <= 1e-5


def deepseek_pair(bias_std=0.05):
    config = DeepseekV3Config(hidden_size=H, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                              moe_intermediate_size=16, n_shared_experts=1, routed_scaling_factor=2.5,
                              norm_topk_prob=True)
    theirs = DeepseekV3MoE(config).eval()
    randomize(theirs)
    theirs.gate.e_score_correction_bias.normal_(0, bias_std)
    ours = moebuild.build_module({
        "pools": {"routed": {"num_experts": 8, "intermediate_size": 16},
                  "shared": {"num_experts": 1, "intermediate_size": 16}},
        "routes": [{"pool": "shared", "router": {"type": "dense"}},
                   {"pool": "routed", "router": {"type": "topk", "top_k": 2, "score": "sigmoid", "normalize": True,
                                                 "scale": 2.5, "bias": True,
                                                 "groups": {"num_groups": 4, "top_groups": 2}}}],
    }, hidden_size=H).eval()
    router = ours.routes[1].router
    router.weight.data.copy_(theirs.gate.weight)
    router.e_score_correction_bias.copy_(theirs.gate.e_score_correction_bias)
    copy_experts(ours.pools["routed"], theirs.experts)
    copy_mlp_into_pool(ours.pools["shared"], theirs.shared_experts)
    return theirs, ours


def test_deepseek_v3_noaux_tc_router():
    theirs, ours = deepseek_pair()
    x_TD = torch.randn(64, H)
    with torch.no_grad():
        logits, weights, ids = theirs.gate(x_TD)
        routing = ours.routes[1].router.route(x_TD)
    # transformers returns the k experts unsorted: compare as (expert -> weight) maps per token
    assert (as_map(routing.ids_TK, routing.weights_TK) - as_map(ids, weights)).abs().max() <= 1e-5
    assert (routing.logits_TE - logits).abs().max() <= 1e-5
    # the bias changed some selections, never the weights: they are the unbiased sigmoid scores
    unbiased = torch.sigmoid(logits).topk(2, dim=-1).indices.sort(-1).values
    assert not torch.equal(unbiased, routing.ids_TK.sort(-1).values)


def deepseek_vl2_gate(logits_TE, bias_E, method, n_group, topk_group, top_k, norm_topk_prob, scale):
    """DeepSeek-VL2's MoEGate.forward selection (deepseek_vl2/models/modeling_deepseek.py, lines 440-497
    at deepseek-ai/DeepSeek-VL2 HEAD), transcribed: the reference for group-limited routing."""
    T, E = logits_TE.shape
    scores = logits_TE.sigmoid() if method == "noaux_tc" else logits_TE.softmax(dim=-1)
    if method == "group_limited_greedy":
        group_scores = scores.view(T, n_group, -1).max(dim=-1).values
    else:
        scores_for_choice = scores + bias_E[None]
        group_scores = scores_for_choice.view(T, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, -1)
    if method == "group_limited_greedy":
        topk_weight, topk_idx = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=top_k, dim=-1, sorted=False)
    else:
        _, topk_idx = torch.topk(scores_for_choice.masked_fill(~score_mask.bool(), 0.0), k=top_k, dim=-1, sorted=False)
        topk_weight = scores.gather(1, topk_idx)
    if top_k > 1 and norm_topk_prob:
        return topk_idx, topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20) * scale
    return topk_idx, topk_weight * scale


def as_map(ids, weights, experts=8):
    """(expert -> weight) per token: DeepSeek and transformers return the k experts unsorted."""
    return torch.zeros(ids.shape[0], experts).scatter(1, ids, weights)


def test_noaux_tc_fills_dropped_groups_with_zero_as_deepseek_so_negative_biases_can_pick_them():
    _, ours = deepseek_pair()
    router = ours.routes[1].router
    router.e_score_correction_bias.normal_(-1.0, 0.05)  # every biased score in (-1, 0)
    x_TD = torch.randn(64, H)
    with torch.no_grad():
        routing = router.route(x_TD)
        ids, weights = deepseek_vl2_gate(routing.logits_TE, router.e_score_correction_bias, "noaux_tc", 4, 2, 2,
                                         True, 2.5)
    assert (as_map(routing.ids_TK, routing.weights_TK) - as_map(ids, weights)).abs().max() <= 1e-5
    # the 0.0 of a dropped group beats the kept groups' negative scores: experts of dropped groups are chosen
    biased = torch.sigmoid(routing.logits_TE) + router.e_score_correction_bias
    kept_TG = biased.view(64, 4, 2).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    in_kept_TK = (routing.ids_TK[..., None] // 2 == kept_TG[:, None, :]).any(-1)
    assert not in_kept_TK.all()


def test_group_limited_greedy_ranks_groups_by_their_best_expert_as_deepseek_v2():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
        DeepseekV2TopkRouter,
    )

    config = DeepseekV2Config(hidden_size=H, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                              topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    theirs = DeepseekV2TopkRouter(config)
    randomize(theirs, std=0.1)
    spec = {"type": "topk", "top_k": 3, "scale": 1.5, "groups": {"num_groups": 4, "top_groups": 2, "rank_by": "max"}}
    ours = moebuild.build_module(
        {"pools": {"routed": {"num_experts": 16, "intermediate_size": 16}}, "routes": [{"pool": "routed", "router": spec}]},
        hidden_size=H).eval().routes[0].router
    ours.weight.data.copy_(theirs.weight)
    x_TD = torch.randn(64, H)
    with torch.no_grad():
        _, weights, ids = theirs(x_TD)
        routing = ours.route(x_TD)
        ref_ids, ref_weights = deepseek_vl2_gate(routing.logits_TE, None, "group_limited_greedy", 4, 2, 3, False, 1.5)
    got = as_map(routing.ids_TK, routing.weights_TK, 16)
    assert (got - as_map(ids, weights, 16)).abs().max() <= 1e-5
    assert (got - as_map(ref_ids, ref_weights, 16)).abs().max() <= 1e-5
    ours.group_rank = "top2_sum"  # V3's rule keeps other groups for some tokens
    with torch.no_grad():
        assert not torch.equal(ours.route(x_TD).ids_TK.sort(-1).values, routing.ids_TK.sort(-1).values)


def test_deepseek_v3_moe_block():
    theirs, ours = deepseek_pair()
    x_BSD = torch.randn(3, 5, H)
    with torch.no_grad():
        want = theirs(x_BSD)
        got = ours(x_BSD).hidden_states
    assert (got - want).abs().max() <= 1e-5
