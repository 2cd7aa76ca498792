"""ExpertPool: transformers-5 layout (checked against MixtralExperts with the same tensors),
the shared-expert equivalence, meta builds and initialisation."""

import pytest
import torch
from torch.nn import functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from moebuild.moe.experts import ExpertPool
from moebuild.moe.routers.topk import DenseRouter


def test_parameter_layout():
    gated = ExpertPool(4, 8, 6, bias=True)
    assert {n: tuple(p.shape) for n, p in gated.named_parameters()} == {
        "gate_up_proj": (4, 12, 8),
        "down_proj": (4, 8, 6),
        "gate_up_proj_bias": (4, 12),
        "down_proj_bias": (4, 8),
    }
    plain = ExpertPool(4, 8, 6, gated=False, activation="gelu_new")
    assert {n: tuple(p.shape) for n, p in plain.named_parameters()} == {"up_proj": (4, 6, 8), "down_proj": (4, 8, 6)}


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_matches_transformers_mixtral_experts(backend):
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, hidden_act="silu")
    theirs = MixtralExperts(config)
    ours = ExpertPool(4, 16, 24, activation="silu", backend=backend)
    for p in theirs.parameters():
        p.data.normal_(0, 0.2)
    ours.load_state_dict(theirs.state_dict())
    x_TD = torch.randn(10, 16)
    probs_TE = torch.randn(10, 4).softmax(-1)
    weights_TK, ids_TK = probs_TE.topk(2, dim=-1)
    torch.testing.assert_close(ours(x_TD, weights_TK, ids_TK), theirs(x_TD, ids_TK, weights_TK), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_shared_pool_of_two_equals_one_mlp_of_twice_the_width(backend):
    """DeepSeek-MoE's shared experts: 2 experts of size I behind a dense router are one SwiGLU of 2I."""
    torch.manual_seed(0)
    E, D, I = 2, 16, 8
    pool = ExpertPool(E, D, I, backend=backend)
    gate_2ID = torch.cat([pool.gate_up_proj[e, :I] for e in range(E)])
    up_2ID = torch.cat([pool.gate_up_proj[e, I:] for e in range(E)])
    down_D2I = torch.cat([pool.down_proj[e] for e in range(E)], dim=1)
    x_TD = torch.randn(7, D)
    mlp = F.linear(F.silu(F.linear(x_TD, gate_2ID)) * F.linear(x_TD, up_2ID), down_D2I)
    routing = DenseRouter(E).route(x_TD)
    torch.testing.assert_close(pool(x_TD, routing.weights_TK, routing.ids_TK), mlp, rtol=1e-5, atol=1e-6)


def test_meta_build_allocates_nothing():
    # 64 experts of a 4096 -> 14336 SwiGLU: 45 GB in fp32 if anything were allocated.
    pool = ExpertPool(64, 4096, 14336, bias=True, device="meta")
    assert all(p.is_meta for p in pool.parameters())
    assert sum(p.numel() for p in pool.parameters()) == 64 * (3 * 4096 * 14336 + 2 * 14336 + 4096)


def test_init_is_normal_weights_and_zero_biases():
    torch.manual_seed(0)
    pool = ExpertPool(8, 64, 128, bias=True, init_std=0.02, dtype=torch.float64)
    assert pool.gate_up_proj.dtype == torch.float64
    assert abs(pool.gate_up_proj.std().item() - 0.02) < 1e-3
    assert abs(pool.down_proj.mean().item()) < 1e-3
    assert pool.gate_up_proj_bias.abs().max() == 0 and pool.down_proj_bias.abs().max() == 0


ACTIVATIONS = {
    "silu": lambda h: h * torch.sigmoid(h),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / 2**0.5)),
    "gelu_new": lambda h: F.gelu(h, approximate="tanh"),
    "gelu_pytorch_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
    "relu": lambda h: h.clamp_min(0),
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_names(activation):
    pool = ExpertPool(2, 8, 4, activation=activation)
    for p in pool.parameters():
        p.data.normal_(0, 1.0)
    x_TD = torch.randn(3, 8)
    ids_TK = torch.zeros(3, 1, dtype=torch.long)
    h = x_TD @ pool.gate_up_proj[0].T
    want = (ACTIVATIONS[activation](h[:, :4]) * h[:, 4:]) @ pool.down_proj[0].T
    torch.testing.assert_close(pool(x_TD, torch.ones(3, 1), ids_TK), want)


def test_unknown_backend_is_rejected_at_construction():
    with pytest.raises(ValueError, match="unknown dispatch backend"):
        ExpertPool(2, 8, 4, backend="cuda_magic")
