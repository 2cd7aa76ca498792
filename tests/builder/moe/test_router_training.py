"""Every router type in a micro model: gradients reach the routers and training lowers the loss;
the LTDR micro model's routing statistics (tail share, experts per image and text token);
`model.update_balancing()` moving an aux-free bias inside a whole model."""

import pytest
import torch

import moebuild
from moebuild import build
from moebuild.moe.layer import MoELayer

ROUTERS = {
    "topk_all_options": "{type: topk, top_k: 2, score: sigmoid, normalize: true, scale: 2.0, bias: true, "
    "groups: {num_groups: 2, top_groups: 1}, noise: {type: gumbel}, expert_dropout: 0.1, "
    "curriculum: {start_k: 1, steps_per_k: 1}, capacity: {train: 1.0, eval: 2.0, drop: by_score}}",
    "topk_softmax": "{type: topk, top_k: 2, order: topk_softmax, noise: {type: jitter}}",
    "deepspeed_top2": "{type: deepspeed_top2, capacity: {train: 1.5, eval: 2.0}}",
    "expert_choice": "{type: expert_choice, capacity_factor: 2.0}",
    "soft": "{type: soft, slots_per_expert: 2}",
    "threshold": "{type: threshold, threshold: 0.6, max_experts: 3, normalize: true}",
    "dynamic_topk": "{type: dynamic_topk, top_k: 1, tail_top_k: 3}",
    "dense_sigmoid": "{type: dense, gate: sigmoid}",
}
BALANCING = ("moe.balancing=[{type: switch_aux, coef: 0.01}, {type: load_balance, coef: 0.01}, {type: seq_aux, coef: 0.01}, "
             "{type: z_loss, coef: 0.001}, {type: entropy, coef: 0.001}{bias}]")


def _inputs(model, batch=2, text=6):
    g = torch.Generator().manual_seed(0)
    side = model.spec.vision.image_size
    P, image_id = model.num_image_tokens, model.config.image_token_id
    words = torch.randint(3, image_id, (batch, text), generator=g)
    ids = torch.cat([torch.full((batch, 1), 1), torch.full((batch, P), image_id), words], dim=1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding at the end of the second prompt
    return ids, torch.randn(batch, 3, side, side, generator=g), ids.masked_fill(ids == image_id, -100), mask


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_type_trains(name):
    """Gradients reach every router, and 25 Adam steps on one batch (a task the model can learn:
    memorise it) bring the language-model loss under half of where it started."""
    bias = ", {type: aux_free_bias, rate: 0.01}" if "bias: true" in ROUTERS[name] else ""
    balancing = "moe.balancing=[]" if name.startswith("dense") else BALANCING.replace("{bias}", bias)
    spec = moebuild.load_spec("micro-moe-llava", [f"moe.routes.0.router={ROUTERS[name]}", balancing])
    torch.manual_seed(0)
    model = build(spec).train()
    ids, pixels, labels, mask = _inputs(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    routers = [layer.routes[0].router for layer in model.modules() if isinstance(layer, MoELayer)]
    losses = []
    for step in range(25):
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels, output_router_stats=True)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            for router in routers:
                assert router.weight.grad is not None and torch.isfinite(router.weight.grad).all()
                assert router.weight.grad.abs().sum() > 0, name
            stats = out.router_stats[0].stats["all->experts"]["all"]
            assert stats["tokens"].item() == ids.numel() - 2 and stats["load"].dtype == torch.int64
        optimizer.step()
        model.update_balancing()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])


def test_ltdr_micro_model_reports_tail_share_and_experts_per_token():
    spec = moebuild.load_spec("micro-ltdr", ["moe.routes.1.router={type: dynamic_topk, top_k: 2, tail_top_k: 4, normalize: true}"])
    torch.manual_seed(0)
    model = build(spec).eval()
    ids, pixels, _, mask = _inputs(model)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, output_router_stats=True,
                    output_aux_losses=True)
    assert len(out.router_stats) == 2
    for layer in out.router_stats:
        image = layer.stats["image->experts"]["image"]
        text = layer.stats["text->experts"]["text"]
        assert 0 < image["tail_share"].item() < 1
        # tail tokens take 4 experts, the others 2: mean = 2 + 2 * tail share
        assert image["experts_per_token"].item() == pytest.approx(2 + 2 * image["tail_share"].item())
        assert image["experts_per_token"].item() > 2
        assert text["experts_per_token"].item() == 2.0 and text["dropped_fraction"].item() == 0.0
        assert "tail_share" not in text
    assert out.aux_losses.keys() == {"load_balance"}


def test_update_balancing_moves_the_bias_of_a_whole_model():
    spec = moebuild.load_spec("micro-moe-llava", [
        "moe.routes.0.router={type: topk, top_k: 2, score: sigmoid, bias: true}",
        "moe.balancing=[{type: aux_free_bias, rate: 0.5, tokens: text}]",
    ])
    model = build(spec, seed=0).train()
    ids, pixels, labels, mask = _inputs(model)
    model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss.backward()
    routers = [layer.routes[0].router for layer in model.modules() if isinstance(layer, MoELayer)]
    loads = [router.pending_load_E.clone() for router in routers]
    assert all(load.sum() == 2 * (7 + 5) for load in loads)  # top-2 of the text tokens (bos + words), padding not
    model.update_balancing()
    for router, load in zip(routers, loads):
        load = load.float()
        torch.testing.assert_close(router.e_score_correction_bias, 0.5 * torch.sign(load.mean() - load))
    assert sum(p.numel() for p in model.parameters()) == moebuild.summarize(spec).total_params
