"""moebuild.trace against the model's own routing decisions on the same batch."""

import pytest
import torch

import moebuild
from moebuild.tracing.collect import RoutingTrace, _quantiles
from moebuild.tracing.inputs import Sample, batches


def _batch(model, with_image=True):
    rng = torch.Generator().manual_seed(0)
    picture = (torch.rand(40, 56, 3, generator=rng) * 255).to(torch.uint8).numpy()
    samples = [Sample("<image> what is this?", picture if with_image else None), Sample("text only, longer prompt")]
    from PIL import Image

    samples[0].image = Image.fromarray(picture) if with_image else None
    return next(batches(samples, model, batch_size=2))


@pytest.fixture(scope="module")
def ltdr():
    return moebuild.build("micro-ltdr", seed=0).eval()


def test_counts_match_the_models_router_stats(ltdr):
    batch, _ = _batch(ltdr)
    torch.manual_seed(0)  # deepspeed_top2 draws its second choice with Gumbel noise, in eval too
    result = moebuild.trace(ltdr, batch)
    torch.manual_seed(0)
    with torch.no_grad():
        stats = ltdr(**batch, use_cache=False, output_router_stats=True).router_stats
    assert result.layer_indices() == [entry.layer_idx for entry in stats] == [0, 2]
    valid = batch["attention_mask"].bool()
    is_image = batch["input_ids"] == ltdr.config.image_token_id
    for index, layer_stats in zip(result.layer_indices(), [entry.stats for entry in stats]):
        routes = result.layers[index].routes
        assert set(routes) == set(layer_stats)
        for name, groups in layer_stats.items():
            for group, s in groups.items():
                counts = routes[name].groups[group]
                assert counts.tokens == int(s["tokens"])
                assert counts.load.tolist() == s["load"].tolist()
                # kept assignments = selected slots (tokens x k, per token for dynamic_topk) minus drops
                assert int(counts.load.sum()) == counts.selected - round(float(s["dropped_fraction"]) * counts.selected)
        assert routes["text->experts"].groups["all"].tokens == int((valid & ~is_image).sum())
        text = routes["text->experts"].groups["text"]
        assert text.selected == 2 * text.tokens  # deepspeed top-2
        image = routes["image->experts"].groups["image"]
        tail = image.tail
        assert image.selected == 2 * image.tokens + 2 * tail  # top-2, tail tokens top-4
        assert image.coactivation.diagonal().tolist() == image.load.tolist()
    assert len(result.images) == 1 and result.images[0].num_tokens == int(is_image.sum())


def test_top1_is_the_highest_weight_kept_expert(ltdr):
    batch, _ = _batch(ltdr)
    seen = {}
    layer = ltdr.language.model.layers[0].mlp
    route = [r for r in layer.routes if r.tokens == "image"][0]
    handle = route.router.register_forward_hook(lambda m, a, out: seen.setdefault("routing", out))
    try:
        result = moebuild.trace(ltdr, batch)
    finally:
        handle.remove()
    routing = seen["routing"]
    expected = routing.ids_TK.gather(1, routing.weights_TK.argmax(dim=1, keepdim=True)).squeeze(1)
    assert result.images[0].top1[0][route.name] == expected.tolist()


def test_accumulates_over_batches(ltdr):
    batch, _ = _batch(ltdr)
    torch.manual_seed(0)  # deepspeed_top2's Gumbel draws
    once = moebuild.trace(ltdr, batch)
    torch.manual_seed(0)
    first = moebuild.trace(ltdr, batch)
    torch.manual_seed(0)
    twice = moebuild.trace(ltdr, batch, into=first)
    for index in once.layer_indices():
        for name, route in once.layers[index].routes.items():
            assert (twice.layers[index].routes[name].groups["all"].load == 2 * route.groups["all"].load).all()
    assert twice.batches == 2 and len(twice.images) == 2
    assert isinstance(twice, RoutingTrace)


def test_dense_and_several_pools_have_no_top1():
    model = moebuild.build("micro-deepseek-vl2", seed=0).eval()
    batch, images = _batch(model)
    result = moebuild.trace(model, batch)
    kinds = {name: r.kind for layer in result.layers.values() for name, r in layer.routes.items()}
    assert "dense" in kinds.values() and "top1" in kinds.values()
    data = result.to_dict()
    dense = [r for layer in data["layers"] for r in layer["routes"].values() if r["kind"] == "dense"][0]
    assert dense["all"]["experts_per_token"] == dense["num_experts"]
    figures = result.plot_patch_maps(images)
    assert len(figures) == len(result.images) == 1


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_quantiles_are_torch_quantiles(n):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n))
    qs = (0.5, 0.9, 0.99)
    expected = torch.quantile(x.double(), torch.tensor(qs, dtype=torch.double)).tolist()
    assert _quantiles(x, qs) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_quantiles_past_torch_quantiles_limit():
    x = torch.arange(2**24 + 1, dtype=torch.float32).flip(0)  # torch.quantile refuses this size
    assert _quantiles(x, (0.5, 0.25)) == [2**23, 2**22]


def test_rpv_summary_is_the_variance_of_the_routers_scores(ltdr):
    batch, _ = _batch(ltdr)
    layer = ltdr.language.model.layers[0].mlp
    route = [r for r in layer.routes if r.tokens == "image"][0]
    seen = []
    handle = route.router.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    try:
        result = moebuild.trace(ltdr, batch)
    finally:
        handle.remove()
    (route_batch, routing), = seen
    rpv = routing.probs_TE.double().var(dim=-1, correction=0)[route_batch.valid_R].float()
    got = result.to_dict()["layers"][0]["routes"][route.name]["image"]["rpv"]
    assert got["mean"] == pytest.approx(float(rpv.double().mean()), rel=1e-6)
    assert got["std"] == pytest.approx(float(rpv.double().std(correction=0)), rel=1e-5)
    assert (got["min"], got["max"]) == pytest.approx((float(rpv.min()), float(rpv.max())), rel=1e-6)
    assert got["quantile_sample"] == len(rpv) > 0
    expected = torch.quantile(rpv.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.double)).tolist()
    assert list(got["quantiles"].values()) == pytest.approx(expected, rel=1e-6)


def test_recorder_without_top1_keeps_the_same_counts_and_no_calls(ltdr):
    from moebuild.tracing.collect import Recorder

    batch, _ = _batch(ltdr)
    traces = []
    for top1 in (True, False):
        trace_ = RoutingTrace()
        recorder = Recorder(ltdr, trace_, top1=top1)
        torch.manual_seed(0)  # deepspeed_top2's Gumbel draws
        with recorder.record(), torch.no_grad():
            ltdr(**batch, use_cache=False)
        traces.append(trace_)
        assert bool(recorder.calls) == top1
    assert traces[0].to_dict() == traces[1].to_dict()
