"""Every router type of the schema's union, through every verb and the whole model.

Parametrized over the union itself (each schema class carries an example), so a router type
cannot be half-added: its schema facts must match the module it builds, `validate`, `summary`,
`ls`-style counting and `compile` must take it, and padding must never change real tokens.
"""

from __future__ import annotations

import json
import typing

import pytest
import torch
from click.testing import CliRunner

import moebuild
from moebuild import build
from moebuild.accounting import summarize
from moebuild.cli import main
from moebuild.moe.routers.deepspeed import DeepSpeedTop2Router
from moebuild.registry import build_module
from moebuild.schemas import RouterSpec

ROUTERS = {cls.model_fields["type"].annotation.__args__[0]: cls for cls in typing.get_args(typing.get_args(RouterSpec)[0])}


def micro_overrides(router: dict) -> list[str]:
    """micro-moe-llava (4 experts, hidden 128) with its one route taking this router."""
    route = {"tokens": "all", "pool": "experts", "causal": False, "router": router}
    balancing = [] if router["type"] == "dense" else [{"type": "switch_aux", "coef": 0.01}]
    return [f"moe.routes=[{json.dumps(route)}]", f"moe.balancing={json.dumps(balancing)}"]


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_schema_facts_match_the_module(kind):
    cls = ROUTERS[kind]
    node = cls.model_validate(cls.example())
    module = build_module(node, hidden_size=64, num_experts=4)
    assert sum(p.numel() for p in module.parameters()) == node.params(4, 64)
    assert 1 <= node.experts_per_token(4) <= 4


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_every_verb_takes_every_router(kind, tmp_path):
    overrides = micro_overrides(ROUTERS[kind].example())
    spec = moebuild.load_spec("micro-moe-llava", overrides)
    report = summarize(spec)
    model = build(spec, device="meta")
    assert report.total_params == sum(p.numel() for p in model.parameters())
    args = [a for o in overrides for a in ("--set", o)]
    runner = CliRunner()
    for verb in (["validate", "micro-moe-llava"], ["show", "micro-moe-llava"], ["summary", "micro-moe-llava", "--json"],
                 ["compile", "micro-moe-llava", "-o", str(tmp_path / "m")]):
        result = runner.invoke(main, verb + args)
        assert result.exit_code == 0, (verb, result.output)
    assert moebuild.MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "m").spec.moe.routes[0].router.type == kind


def _prompt_padded(model, side: str):
    P, image = model.num_image_tokens, model.config.image_token_id
    real = torch.tensor([[1] + [image] * P + [5, 9, 17, 33, 65, 129]])
    pad = torch.zeros(1, 16, dtype=torch.long)
    ids = torch.cat([pad, real] if side == "left" else [real, pad], dim=1)
    mask = (torch.arange(ids.shape[1]) >= 16) if side == "left" else (torch.arange(ids.shape[1]) < real.shape[1])
    mask = mask[None].long()
    return real, ids, mask, mask.bool()[0]


@pytest.fixture(scope="module", params=sorted(ROUTERS))
def micro_model(request):
    torch.manual_seed(0)
    model = build(moebuild.load_spec("micro-moe-llava", micro_overrides(ROUTERS[request.param].example())))
    for module in model.modules():  # the Gumbel draws would differ with the number of tokens
        if isinstance(module, DeepSpeedTop2Router):
            module.sample_gumbel = torch.zeros_like
    return model


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_real_tokens(micro_model, side, training):
    model = micro_model.train(training)
    real, ids, mask, keep = _prompt_padded(model, side)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        alone = model(input_ids=real, pixel_values=pixels, use_cache=False).logits
        padded = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions,
                       use_cache=False).logits
    torch.testing.assert_close(padded[0, keep], alone[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_routers_said_causal_are_causal_and_the_others_need_causal_false(kind):
    router = ROUTERS[kind].model_validate(ROUTERS[kind].example())
    route = {"tokens": "text", "pool": "experts", "router": ROUTERS[kind].example()}
    override = [f"moe.routes=[{json.dumps(route)}]", "moe.balancing=[]"]
    if router.compares_tokens() is not None:
        with pytest.raises(moebuild.SpecError, match=rf"{kind} is not causal .*write causal: false on the route"):
            moebuild.load_spec("micro-moe-llava", override)
        return
    torch.manual_seed(0)
    model = build(moebuild.load_spec("micro-moe-llava", override)).train()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[:, 4:] = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = (model(input_ids=x, use_cache=False).logits[:, :4] for x in (ids, later))
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)
