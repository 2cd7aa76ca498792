"""MoE blocks against transformers' own modules with copied weights (fp32, max abs diff <= 1e-5):
Qwen2-MoE's sparse block with its sigmoid-gated shared expert, DeepSeek-V3's noaux_tc top-k router
and MoE block (group-limited, correction bias, normalised and scaled weights). Mixtral's router and
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
        routing = ours.routes[1].router(x_TD)
    # transformers returns the k experts unsorted: compare as (expert -> weight) maps per token
    got = torch.zeros(64, 8).scatter(1, routing.ids_TK, routing.weights_TK)
    want = torch.zeros(64, 8).scatter(1, ids, weights)
    assert (got - want).abs().max() <= 1e-5
    assert (routing.logits_TE - logits).abs().max() <= 1e-5
    # the bias changed some selections, never the weights: they are the unbiased sigmoid scores
    unbiased = torch.sigmoid(logits).topk(2, dim=-1).indices.sort(-1).values
    assert not torch.equal(unbiased, routing.ids_TK.sort(-1).values)


def test_deepseek_v3_moe_block():
    theirs, ours = deepseek_pair()
    x_BSD = torch.randn(3, 5, H)
    with torch.no_grad():
        want = theirs(x_BSD)
        got = ours(x_BSD).hidden_states
    assert (got - want).abs().max() <= 1e-5
