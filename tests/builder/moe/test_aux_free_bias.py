"""Aux-loss-free balancing: loads counted in training forwards only (once under activation
checkpointing), consumed by update_balancing as b_e += rate * sign(mean load - load_e)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moebuild.moe.balancing import BalancingCallback, BiasBalancing
from moebuild.moe.batch import IMAGE, TEXT
from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import MoELayer, Route
from moebuild.moe.routers.topk import TopKRouter

D = 8


def biased_layer(tokens="all", rate=0.01):
    torch.manual_seed(0)
    router = TopKRouter(D, 4, 1, score="sigmoid", correction_bias=True)
    router.weight.data.normal_(0, 1.0)
    return MoELayer([Route(router, "experts")], [BiasBalancing(rate, tokens)], {"experts": ExpertPool(4, D, 8)})


def test_update_moves_bias_by_sign_of_load_gap():
    layer = biased_layer().train()
    x_BSD = torch.randn(2, 10, D)
    mask_BS = torch.ones(2, 10, dtype=torch.long)
    mask_BS[1, 7:] = 0
    router = layer.routes[0].router
    ids_T = router.route(x_BSD.reshape(-1, D)).topk_ids_TK[:, 0]
    layer(x_BSD, attention_mask_BS=mask_BS)
    layer(x_BSD, attention_mask_BS=mask_BS, output_router_stats=False)  # counts without statistics too
    load_E = 2 * torch.bincount(ids_T[mask_BS.reshape(-1).bool()], minlength=4)
    assert torch.equal(router.pending_load_E, load_E.float()) and load_E.sum() == 34
    layer.update_balancing()
    want = 0.01 * torch.sign(load_E.float().mean() - load_E.float())
    torch.testing.assert_close(router.e_score_correction_bias, want)
    assert not router.pending_load_E.any()
    layer.update_balancing()  # nothing counted since: no move
    torch.testing.assert_close(router.e_score_correction_bias, want)


def test_no_counting_in_eval_and_scope_by_modality():
    layer = biased_layer("image")
    x_BSD = torch.randn(1, 6, D)
    layer.eval()(x_BSD)
    assert not layer.routes[0].router.pending_load_E.any()
    modality_BS = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, IMAGE, TEXT]])
    layer.train()(x_BSD, modality_BS)
    assert layer.routes[0].router.pending_load_E.sum() == 3


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_counts_once(use_reentrant):
    layer = biased_layer().train()
    x_BSD = torch.randn(2, 5, D, requires_grad=True)
    out = checkpoint(lambda x: layer(x).hidden_states, x_BSD, use_reentrant=use_reentrant)
    out.sum().backward()
    assert layer.routes[0].router.pending_load_E.sum() == 10
    assert x_BSD.grad is not None


def test_callback_calls_update_balancing_after_each_step():
    calls = []

    class Model:
        def update_balancing(self):
            calls.append(1)

    BalancingCallback().on_step_end(None, None, None, model=Model())
    assert calls == [1]


def test_router_level_update_rate_is_the_aux_free_bias_term_spelt_on_the_router():
    """DESIGN.md's `bias: {update_rate: r}` builds the same balancing as `bias: true` + an aux_free_bias term."""
    from moebuild.registry import build_moe
    from moebuild.schemas import MoESpec

    def moe(router_bias, balancing):
        return MoESpec.model_validate({
            "pools": {"experts": {"num_experts": 4, "intermediate_size": 8}},
            "routes": [{"tokens": "text", "pool": "experts",
                        "router": {"type": "topk", "top_k": 1, "score": "sigmoid", "bias": router_bias}}],
            "balancing": balancing,
        })

    spelt_on_router = build_moe(moe({"update_rate": 0.02}, []), hidden_size=D)
    spelt_as_term = build_moe(moe(True, [{"type": "aux_free_bias", "rate": 0.02, "tokens": "text"}]), hidden_size=D)
    assert spelt_on_router.bias_balancing == spelt_as_term.bias_balancing == [BiasBalancing(0.02, "text")]
    with pytest.raises(ValueError, match="give the bias update rate once"):
        moe({"update_rate": 0.02}, [{"type": "aux_free_bias", "rate": 0.02}])


def test_in_a_bf16_model_the_bias_and_loads_stay_fp32_and_keep_moving():
    layer = biased_layer(rate=0.001).to(torch.bfloat16).train()
    router = layer.routes[0].router
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == router.pending_load_E.dtype == torch.float32
    router.e_score_correction_bias.fill_(0.5)
    for _ in range(2000):  # one expert always under-loaded: its bias rises by 0.001 a step
        router.pending_load_E.copy_(torch.tensor([0.0, 10.0, 10.0, 10.0]))
        layer.update_balancing()
    torch.testing.assert_close(router.e_score_correction_bias[0], torch.tensor(2.5), atol=1e-4, rtol=0)
    layer.to(torch.float64)  # cast again: the balancing state is moved, never cast
    assert router.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(router.e_score_correction_bias[0], torch.tensor(2.5), atol=1e-4, rtol=0)


def test_a_meta_build_initialises_balancing_state_after_to_empty():
    import moebuild

    spec = moebuild.load_spec("micro-deepseek-vl2", [
        "moe.routes.1.router.bias=true", "+moe.routes.1.router.curriculum={steps_per_k: 10}",
        "moe.routes.0.router.gate=none", "+moe.balancing.1={type: aux_free_bias}"])
    model = moebuild.build(spec, device="meta")
    model.to_empty(device="cpu")
    for module in model.modules():  # to_empty leaves garbage: make it visible
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                buffer.fill_(float("nan"))
    model.init_weights()
    fresh = dict(moebuild.build(spec).named_buffers())
    for name, buffer in model.named_buffers():  # rotary tables, positions, balancing state: as built
        assert torch.equal(buffer, fresh[name]), name
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert routers
    for router in routers:
        assert not router.e_score_correction_bias.any() and not router.pending_load_E.any() and router.step == 0
        assert router.e_score_correction_bias.dtype == torch.float32
        assert torch.isfinite(router.weight).all() and router.weight.std() > 0
