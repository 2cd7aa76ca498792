"""The registry covers every type the spec language can name: a type cannot be half-added.

Routers are exercised in depth by tests/builder/moe/test_every_router.py (schema facts against the
module, every verb, padding, causality); here every union of the schema is checked against
registry.REGISTRY, and every balancing term and component type is built and run once.
"""

from __future__ import annotations

import json
import typing

import pytest
import torch

import moebuild
from moebuild.registry import REGISTRY, build_module
from moebuild.schemas import BalancingSpec, ConnectorSpec, LanguageSpec, MoESpec, PoolSpec, RouterSpec, VisionSpec


def members(union) -> list[type]:
    return list(typing.get_args(typing.get_args(union)[0]))


UNIONS = {"vision": VisionSpec, "connector": ConnectorSpec, "router": RouterSpec, "balancing": BalancingSpec}


@pytest.mark.parametrize("union", UNIONS)
def test_every_member_of_every_union_has_a_builder(union):
    missing = [cls.__name__ for cls in members(UNIONS[union]) if cls not in REGISTRY]
    assert missing == []


def test_every_node_class_with_a_module_is_registered():
    assert {LanguageSpec, MoESpec, PoolSpec} <= REGISTRY.keys()


@pytest.mark.parametrize("term", members(BalancingSpec), ids=lambda cls: cls.__name__)
def test_every_balancing_term_builds_and_reports_under_its_type(term):
    kind = term.model_fields["type"].annotation.__args__[0]
    node = {"type": kind, "rate": 0.01} if kind == "aux_free_bias" else {"type": kind, "coef": 0.5}
    bias = kind == "aux_free_bias"
    route = {"tokens": "all", "pool": "experts", "causal": False,
             "router": {"type": "topk", "top_k": 2, "bias": bias}}
    spec = moebuild.load_spec("micro-moe-llava", [f"moe.routes=[{json.dumps(route)}]", f"moe.balancing=[{json.dumps(node)}]"])
    torch.manual_seed(0)
    model = moebuild.build(spec).train()
    ids = torch.randint(3, 500, (2, 6))
    out = model(input_ids=ids, labels=ids)
    assert set(out.aux_losses) == (set() if bias else {kind})
    assert all(torch.isfinite(v) and v > 0 for v in out.aux_losses.values())
    if bias:
        model.update_balancing()
        biases = [m.e_score_correction_bias for m in model.modules() if getattr(m, "has_correction_bias", False)]
        assert biases and all(b.abs().sum() > 0 for b in biases)  # loads were counted, the biases moved


@pytest.mark.parametrize("preset", ["micro-moe-llava", "micro-deepseek-vl2"])
def test_components_build_alone_from_their_nodes(preset):
    spec = moebuild.load_spec(preset)
    vision = build_module(spec.vision)
    connector = build_module(spec.connector, in_dim=vision.hidden_size, out_dim=spec.language.hidden_size)
    pixels = torch.randn(1, 3, spec.vision.image_size, spec.vision.image_size)
    with torch.no_grad():
        features = connector(vision(pixels))
    assert features.shape[-1] == spec.language.hidden_size
    layer = build_module(spec.moe, hidden_size=spec.language.hidden_size)
    assert layer(torch.randn(1, 4, spec.language.hidden_size)).hidden_states.shape == (1, 4, spec.language.hidden_size)
