"""Modality-aware routing graphs: hard modality routes, hierarchical and soft modality routing,
context (token-graph message passing) and query (preceding-text) routers -- each against a
written-out computation, then inside a micro model (train step, cached generation)."""

import pytest
import torch

import moebuild
from moebuild import build
from moebuild.moe.batch import LayerCall
from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import MoELayer, Route
from moebuild.moe.routers.contextual import (
    ContextRouter,
    QueryRouter,
    neighbour_mean,
    preceding_text_mean,
)
from moebuild.moe.routers.hierarchical import HierarchicalRouter, ModalityMixRouter
from moebuild.moe.routers.topk import TopKRouter
from moebuild.schemas import ModelSpec

D, TEXT, IMAGE = 6, 0, 1

# Two sequences: [text, 2x2 image, text] and [padding, text, text, 1-token image, text, text].
MODALITY_BS = torch.tensor([[TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT], [TEXT, TEXT, TEXT, IMAGE, TEXT, TEXT]])
VALID_BS = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]).bool()


def context(x_BSD=None, modality_BS=MODALITY_BS, valid_BS=VALID_BS):
    if x_BSD is None:
        x_BSD = torch.randn(*modality_BS.shape, D, generator=torch.Generator().manual_seed(0))
    return LayerCall(x_BSD, modality_BS, valid_BS)


def test_image_grid_and_token_graph():
    ctx = context()
    assert ctx.grid_T2[:6].tolist() == [[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1], [-1, -1]]
    assert ctx.grid_T2[9].tolist() == [0, 0]
    edges = set(map(tuple, ctx.edge_index_2N.t().tolist()))
    grid = {(1, 2), (2, 1), (1, 3), (3, 1), (2, 4), (4, 2), (3, 4), (4, 3)}
    chain = {(0, 5), (7, 8), (8, 10), (10, 11)}  # source -> target: each text token hears its predecessor
    assert edges == grid | chain


def test_non_square_run_lies_row_major_on_a_ceil_sqrt_grid():
    ctx = context(modality_BS=torch.tensor([[IMAGE] * 5]), valid_BS=torch.ones(1, 5, dtype=torch.bool))
    assert ctx.grid_T2.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]
    edges = set(map(tuple, ctx.edge_index_2N.t().tolist()))
    assert edges == {(a, b) for a, b in [(0, 1), (1, 2), (0, 3), (1, 4), (3, 4)]} | {(b, a) for a, b in [(0, 1), (1, 2), (0, 3), (1, 4), (3, 4)]}


def test_neighbour_mean_is_the_hand_written_average():
    ctx = context()
    x = ctx.x_TD
    zero = torch.zeros(D)
    want = torch.stack([
        zero, (x[2] + x[3]) / 2, (x[1] + x[4]) / 2, (x[1] + x[4]) / 2, (x[2] + x[3]) / 2, x[0],
        zero, zero, x[7], zero, x[8], x[10],
    ])
    got = neighbour_mean(x, ctx.edge_index_2N)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(neighbour_mean(x, ctx.edge_index_2N, hops=2), neighbour_mean(got, ctx.edge_index_2N))


@pytest.mark.parametrize("changed", ["other_sequence", "padding", "later_text"])
def test_no_information_crosses_sequences_padding_or_the_future(changed):
    base = context()
    x_BSD = base.x_BSD.clone()
    if changed == "other_sequence":
        x_BSD[1] += 5.0
        unchanged = slice(0, 6)
    elif changed == "padding":
        x_BSD[1, 0] += 5.0
        unchanged = slice(0, 12)
    else:
        x_BSD[1, 5] += 5.0  # the last text token: nothing before it may hear it
        unchanged = slice(0, 11)
    for hops in (1, 3):
        before = neighbour_mean(base.x_TD, base.edge_index_2N, hops)
        after = neighbour_mean(context(x_BSD).x_TD, base.edge_index_2N, hops)
        torch.testing.assert_close(after[unchanged], before[unchanged])
        before, after = (preceding_text_mean(c.x_BSD, c.text_BS).reshape(-1, D) for c in (base, context(x_BSD)))
        torch.testing.assert_close(after[unchanged], before[unchanged])


def test_preceding_text_mean_by_hand():
    ctx = context()
    x = ctx.x_TD
    zero = torch.zeros(D)
    want = torch.stack([
        zero, x[0], x[0], x[0], x[0], x[0],
        zero, zero, x[7], (x[7] + x[8]) / 2, (x[7] + x[8]) / 2, (x[7] + x[8] + x[10]) / 3,
    ])
    torch.testing.assert_close(preceding_text_mean(ctx.x_BSD, ctx.text_BS).reshape(-1, D), want)


def _topk_by_formula(weight_ED, z_RD, k):
    probs = (z_RD @ weight_ED.t()).softmax(-1)
    w, ids = probs.topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("kind", ["context", "query"])
def test_feature_routers_gate_on_token_and_context(kind):
    torch.manual_seed(0)
    gate = TopKRouter(2 * D, 4, 2, normalize=True)
    gate.weight.data.normal_(0, 1.0)
    router = ContextRouter(gate, hops=1) if kind == "context" else QueryRouter(gate)
    ctx = context()
    index_R = torch.tensor([1, 2, 3, 4, 9])  # the image tokens
    routing = router(ctx.route(index_R))
    extra = (neighbour_mean(ctx.x_TD, ctx.edge_index_2N) if kind == "context"
             else preceding_text_mean(ctx.x_BSD, ctx.text_BS).reshape(-1, D))[index_R]
    w, ids = _topk_by_formula(gate.weight, torch.cat([ctx.x_TD[index_R], extra], -1), 2)
    torch.testing.assert_close(routing.weights_TK, w)
    assert torch.equal(routing.ids_TK, ids)


def expert(pool, e, x_D):
    """Expert e of the pool alone on one token (weight 1, one slot)."""
    return pool(x_D[None], torch.ones(1, 1), torch.tensor([[e]]))[0]


def make_grouped_layer(router):
    torch.manual_seed(0)
    pool = ExpertPool(5, D, 8)
    layer = MoELayer([Route(router, "experts", "all")], [], {"experts": pool})
    for p in layer.parameters():
        p.data.normal_(0, 0.7)
    return layer, pool


def test_hierarchical_matches_the_two_level_computation():
    router = HierarchicalRouter(D, [2, 3], top_groups=1, top_k=2)
    layer, pool = make_grouped_layer(router)
    ctx = context()
    out = layer(ctx.x_BSD, MODALITY_BS, VALID_BS.long()).hidden_states.reshape(-1, D)
    groups = [range(0, 2), range(2, 5)]
    for t, x in enumerate(ctx.x_TD):
        p_group = (router.group_weight @ x).softmax(-1)
        g = int(p_group.argmax())
        p_in = (router.weight[list(groups[g])] @ x).softmax(-1)
        w, local = p_in.topk(2)
        want = sum(p_group[g] * w[k] * expert(pool, groups[g][int(local[k])], x) for k in range(2))
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)
    joint = router.route(ctx.x_TD).probs_TE
    torch.testing.assert_close(joint.sum(-1), torch.ones(12))


def test_modality_mix_weights_every_group_by_the_tokens_modality():
    router = ModalityMixRouter(D, [2, 3], top_k=1)
    layer, pool = make_grouped_layer(router)
    ctx = context()
    out = layer(ctx.x_BSD, MODALITY_BS, VALID_BS.long()).hidden_states.reshape(-1, D)
    for t, (x, m) in enumerate(zip(ctx.x_TD, MODALITY_BS.reshape(-1).tolist())):
        mix = router.modality_logits[m].softmax(-1)
        want = 0
        for g, members in enumerate([[0, 1], [2, 3, 4]]):
            p_in = (router.weight[members] @ x).softmax(-1)
            want = want + mix[g] * p_in.max() * expert(pool, members[int(p_in.argmax())], x)
        torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)


# --- in the micro model --------------------------------------------------------------------

def micro_spec(routes, pools=None) -> ModelSpec:
    data = moebuild.load_spec("micro-moe-llava").model_dump(mode="json")
    data["moe"]["routes"] = routes
    if pools is not None:
        data["moe"]["pools"] = pools
    return ModelSpec.model_validate(data)


ROUTERS = {
    "hierarchical": {"tokens": "all", "pool": "experts",
                     "router": {"type": "hierarchical", "groups": {"image": 2, "text": 2}, "top_groups": 1, "top_k": 1}},
    "modality_mix": {"tokens": "all", "pool": "experts",
                     "router": {"type": "modality_mix", "groups": {"image": 2, "text": 2}, "top_k": 1}},
    "context": {"tokens": "image", "pool": "experts", "router": {"type": "context", "top_k": 2, "hops": 2}},
    "query": {"tokens": "image", "pool": "experts", "router": {"type": "query", "top_k": 2, "normalize": True}},
}
TEXT_ROUTE = {"tokens": "text", "pool": "experts", "router": {"type": "topk", "top_k": 2}}


def micro_model(kind):
    routes = [ROUTERS[kind]] if ROUTERS[kind]["tokens"] == "all" else [TEXT_ROUTE, ROUTERS[kind]]
    torch.manual_seed(0)
    return build(micro_spec(routes))


def prompt(model, seed=0):
    """bos, 3 words of question, the image, 2 more words: the query router has text to pool."""
    g = torch.Generator().manual_seed(seed)
    side, P, image_id = model.spec.vision.image_size, model.num_image_tokens, model.config.image_token_id
    words = torch.randint(3, image_id, (2, 5), generator=g)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), words[:, :3], torch.full((2, P), image_id), words[:, 3:]], 1)
    return ids, torch.randn(2, 3, side, side, generator=g)


@pytest.mark.parametrize("kind", list(ROUTERS))
def test_each_router_trains_in_the_micro_model(kind):
    model = micro_model(kind).train()
    ids, pixels = prompt(model)
    out = model(input_ids=ids, pixel_values=pixels, labels=ids.masked_fill(ids == model.config.image_token_id, -100))
    assert torch.isfinite(out.loss) and out.aux_losses["switch_aux"] > 0
    out.loss.backward()
    layer = model.language.layers[0].mlp
    grads = [p.grad for route in layer.routes for p in route.router.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["context", "query"])
def test_cached_generation_of_image_routes_equals_full_recompute(kind):
    model = micro_model(kind).eval()
    ids, pixels = prompt(model)
    ids, pixels = ids[:1], pixels[:1]
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        for step in range(3):
            logits = model(input_ids=out[:, : ids.shape[1] + step], pixel_values=pixels, use_cache=False).logits
            assert logits[0, -1].argmax() == out[0, ids.shape[1] + step]


def test_vl_moe_hard_routing_sends_image_tokens_only_to_the_vision_pool():
    pools = {"vision": {"num_experts": 2, "intermediate_size": 64}, "language": {"num_experts": 2, "intermediate_size": 64}}
    routes = [{"tokens": "image", "pool": "vision", "router": {"type": "topk", "top_k": 1}},
              {"tokens": "text", "pool": "language", "router": {"type": "topk", "top_k": 1}}]
    torch.manual_seed(0)
    model = build(micro_spec(routes, pools)).eval()
    layer = model.language.layers[0].mlp
    seen = {}
    layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(layer_in=args[0], **kwargs), with_kwargs=True)
    for name in pools:
        layer.pools[name].register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0]}))
    ids, pixels = prompt(model)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)
    is_image = (ids == model.config.image_token_id).reshape(-1)
    x_TD = seen["layer_in"].reshape(-1, seen["layer_in"].shape[-1])
    assert torch.equal(seen["modality_BS"].reshape(-1).bool(), is_image)
    assert torch.equal(seen["vision"], x_TD[is_image])
    assert torch.equal(seen["language"], x_TD[~is_image])


def test_group_sizes_must_fill_the_pool():
    bad = {"tokens": "all", "pool": "experts", "router": {"type": "hierarchical", "groups": {"a": 1, "b": 2}}}
    with pytest.raises(ValueError, match=r"group sizes sum to 3, but pool 'experts' has 4 experts"):
        micro_spec([bad])
    with pytest.raises(ValueError, match="smallest group"):
        micro_spec([{**bad, "router": {**bad["router"], "groups": {"a": 2, "b": 2}, "top_k": 3}}])
