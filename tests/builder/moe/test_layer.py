"""MoELayer: the routing graph against a token-at-a-time loop, balancing scopes, stats, gradients."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moebuild.moe.balancing import LoadBalance, SwitchAux, ZLoss, switch_aux, z_loss
from moebuild.moe.batch import IMAGE, TEXT
from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import MoELayer, Route
from moebuild.moe.routers.base import Capacity
from moebuild.moe.routers.topk import DenseRouter, TopKRouter

D = 16


def make_layer(balancing=(), backend="torch", device=None):
    """LTDR/DeepSeek-VL2-like graph: text top-2 softmax, image top-1 sigmoid (own pool), shared dense."""
    torch.manual_seed(0)
    pools = {
        "experts": ExpertPool(4, D, 12, backend=backend, device=device),
        "vision": ExpertPool(3, D, 8, gated=False, activation="gelu", bias=True, backend=backend, device=device),
        "shared": ExpertPool(2, D, 6, backend=backend, device=device),
    }
    routes = [
        Route(TopKRouter(D, 4, 2, normalize=True, device=device), "experts", "text"),
        Route(TopKRouter(D, 3, 1, score="sigmoid", scale=2.0, device=device), "vision", "image"),
        Route(DenseRouter(2), "shared", "all"),
    ]
    layer = MoELayer(routes, list(balancing), pools)
    if device != "meta":
        for p in layer.parameters():  # larger than the 0.02 init so routing is not a coin toss
            p.data.normal_(0, 0.5)
    return layer


def expert_out(pool, e, x_D):
    w_in = pool.gate_up_proj if pool.gated else pool.up_proj
    b_in = pool.gate_up_proj_bias if pool.gated else pool.up_proj_bias
    h = w_in[e] @ x_D + (b_in[e] if b_in is not None else 0)
    I = pool.intermediate_size
    h = pool.act_fn(h[:I]) * h[I:] if pool.gated else pool.act_fn(h)
    return pool.down_proj[e] @ h + (pool.down_proj_bias[e] if pool.down_proj_bias is not None else 0)


def token_loop(layer, x_TD, modality_T):
    """Each token alone: every matching route's router by its formula, then the weighted experts."""
    text, image, shared = layer.routes
    rows = []
    for x_D, m in zip(x_TD, modality_T.tolist()):
        y_D = sum(expert_out(layer.pools["shared"], e, x_D) for e in range(2))
        if m == TEXT:
            probs = (text.router.weight @ x_D).softmax(-1)
            w, ids = probs.topk(2)
            pool = layer.pools["experts"]
            y_D = y_D + sum(w[k] / w.sum() * expert_out(pool, int(ids[k]), x_D) for k in range(2))
        else:
            probs = torch.sigmoid(image.router.weight @ x_D)
            e = int(probs.argmax())
            y_D = y_D + 2.0 * probs[e] * expert_out(layer.pools["vision"], e, x_D)
        rows.append(y_D)
    return torch.stack(rows)


def inputs():
    g = torch.Generator().manual_seed(1)
    x_BSD = torch.randn(2, 6, D, generator=g)
    modality_BS = torch.tensor([[TEXT, IMAGE, IMAGE, IMAGE, TEXT, TEXT], [TEXT, TEXT, IMAGE, TEXT, TEXT, TEXT]])
    attention_mask_BS = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return x_BSD, modality_BS, attention_mask_BS


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_matches_token_loop(backend):
    layer = make_layer(backend=backend)
    x_BSD, modality_BS, attention_mask_BS = inputs()
    out = layer(x_BSD, modality_BS, attention_mask_BS)
    want = token_loop(layer, x_BSD.reshape(-1, D), modality_BS.reshape(-1)).view_as(x_BSD)
    torch.testing.assert_close(out.hidden_states, want, rtol=1e-5, atol=1e-5)


def test_padding_goes_through_experts_and_modality_defaults_to_text():
    layer = make_layer()
    x_BSD, modality_BS, attention_mask_BS = inputs()
    masked = layer(x_BSD, modality_BS, attention_mask_BS).hidden_states
    torch.testing.assert_close(masked, layer(x_BSD, modality_BS).hidden_states)
    all_text = torch.full_like(modality_BS, TEXT)
    torch.testing.assert_close(layer(x_BSD).hidden_states, layer(x_BSD, all_text).hidden_states)


def test_balancing_terms_are_scoped_and_skip_dense_routes():
    terms = [SwitchAux(0.1, "text"), ZLoss(0.01), LoadBalance(1.0, "image")]
    layer = make_layer(terms)
    x_BSD, modality_BS, attention_mask_BS = inputs()
    out = layer(x_BSD, modality_BS, attention_mask_BS)
    x_TD, m_T, valid_T = x_BSD.reshape(-1, D), modality_BS.reshape(-1), attention_mask_BS.reshape(-1).bool()
    text, image = layer.routes[0].router, layer.routes[1].router
    t_routing, i_routing = text.route(x_TD[m_T == TEXT]), image.route(x_TD[m_T == IMAGE])
    t_valid, i_valid = valid_T[m_T == TEXT], valid_T[m_T == IMAGE]
    assert t_valid.sum() == 6 and not t_valid.all()  # padding is among the text tokens
    want_switch = 0.1 * switch_aux(t_routing.probs_TE, t_routing.topk_ids_TK, t_valid)
    want_z = 0.01 * (z_loss(t_routing.logits_TE, t_valid) + z_loss(i_routing.logits_TE, i_valid))
    # load_balance over image tokens only: the image route's top-1 counts and sigmoid scores
    E = 3
    f = torch.bincount(i_routing.topk_ids_TK[:, 0], minlength=E).float() / 4
    want_lb = E * (f * i_routing.probs_TE.mean(0)).sum()
    assert out.aux_losses.keys() == {"switch_aux", "z_loss", "load_balance"}
    torch.testing.assert_close(out.aux_losses["switch_aux"], want_switch)
    torch.testing.assert_close(out.aux_losses["z_loss"], want_z)
    torch.testing.assert_close(out.aux_losses["load_balance"], want_lb)


def test_router_stats():
    layer = make_layer()
    layer.routes[0].router.capacity = Capacity(train=0.5)  # C = ceil(8 * 2 * 0.5 / 4) = 2 slots per expert
    x_BSD, modality_BS, attention_mask_BS = inputs()
    stats = layer.train()(x_BSD, modality_BS, attention_mask_BS).router_stats
    assert stats.keys() == {"text->experts", "image->vision", "all->shared"}
    assert stats["text->experts"].keys() == {"all", "text"} and stats["all->shared"].keys() == {"all", "text", "image"}
    text = stats["text->experts"]["all"]
    torch.testing.assert_close(stats["text->experts"]["text"], text)  # a text route: every token is text
    assert text["load"].dtype == torch.int64 and text["load"].max() <= 2
    kept = text["load"].sum().item()  # counted over the 6 non-padding text tokens
    assert text["dropped_fraction"].item() == pytest.approx(1 - kept / 12)
    assert text["experts_per_token"].item() == pytest.approx(kept / 6)
    assert text["tokens"].item() == 6
    shared = stats["all->shared"]
    assert shared["all"]["load"].tolist() == [10, 10] and shared["image"]["load"].tolist() == [4, 4]
    assert shared["text"]["tokens"].item() == 6 and shared["image"]["experts_per_token"].item() == 2.0
    assert "entropy" not in shared["all"]
    probs_TE = layer.routes[1].router.route(x_BSD.reshape(-1, D)[modality_BS.reshape(-1) == IMAGE]).probs_TE
    p = probs_TE / probs_TE.sum(-1, keepdim=True)
    want = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(stats["image->vision"]["image"]["entropy"], want)
    assert 0 < want < math.log(3)


def test_router_stats_only_when_asked():
    layer = make_layer([SwitchAux(0.1, "text")])
    x_BSD, modality_BS, attention_mask_BS = inputs()
    asked = layer(x_BSD, modality_BS, attention_mask_BS)
    unasked = layer(x_BSD, modality_BS, attention_mask_BS, output_router_stats=False)
    assert len(asked.router_stats) == 3 and unasked.router_stats == {}
    torch.testing.assert_close(unasked.hidden_states, asked.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(unasked.aux_losses, asked.aux_losses, rtol=0, atol=0)


def test_backward_reaches_routers_and_every_expert_weight():
    layer = make_layer([SwitchAux(0.01)])
    x_BSD, modality_BS, attention_mask_BS = inputs()
    out = layer(x_BSD, modality_BS, attention_mask_BS)
    (out.hidden_states.square().sum() + sum(out.aux_losses.values())).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_route_without_tokens():
    layer = make_layer([SwitchAux(0.01, "image")])
    x_BSD = torch.randn(1, 4, D, requires_grad=True)
    out = layer(x_BSD)  # all text: the image route gets no tokens
    assert out.aux_losses["switch_aux"].item() == 0.0
    image = out.router_stats["image->vision"]["image"]
    assert image["load"].tolist() == [0, 0, 0] and image["experts_per_token"].item() == 0.0
    out.hidden_states.sum().backward()
    assert x_BSD.grad.abs().sum() > 0


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_route_over_all_tokens_takes_them_without_selecting():
    """Equals the same route selecting every token (all text), gradients included, without the
    `nonzero` (a host sync on GPU), gather and scatter that a selection costs."""
    torch.manual_seed(0)
    router, pool = TopKRouter(D, 4, 2), ExpertPool(4, D, 12)
    for p in [*router.parameters(), *pool.parameters()]:
        p.data.normal_(0, 0.5)
    x_BSD = torch.randn(2, 5, D)
    results, ops = {}, {}
    for tokens in ("all", "text"):
        layer = MoELayer([Route(router, "experts", tokens)], [], {"experts": pool})
        x = x_BSD.clone().requires_grad_()
        with OpNames() as seen:
            y = layer(x, output_router_stats=False).hidden_states  # the statistics index by masks
        ops[tokens] = seen.names
        results[tokens] = (y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()]))
    for got, want in zip(results["all"], results["text"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert {"nonzero", "index", "index_add"} <= ops["text"]
    assert not {"nonzero", "index", "index_add"} & ops["all"]


def test_meta_build_and_construction_errors():
    layer = make_layer(device="meta")
    assert all(p.is_meta for p in layer.parameters())
    router = TopKRouter(D, 2, 1)
    pools = {"experts": ExpertPool(2, D, 4)}
    with pytest.raises(ValueError, match="not in"):
        MoELayer([Route(router, "missing")], [], pools)
    with pytest.raises(ValueError, match="unique"):
        MoELayer([Route(router, "experts"), Route(router, "experts")], [], pools)
    with pytest.raises(ValueError, match="unknown token selector"):
        Route(router, "experts", "audio")
    with pytest.raises(ValueError, match="unknown token selector"):
        SwitchAux(1.0, "audio")
