"""Rules of the spec models, each checked on a broken copy of a micro preset."""

import copy
from importlib.resources import files

import pytest
from pydantic import ValidationError
from ruamel.yaml import YAML

from moebuild.schemas import CrossFieldError, ModelSpec, moe_layer_indices
from moebuild.schemas.moe import FirstKDenseSpec


def _preset(family, name):
    return YAML(typ="safe").load(files("moebuild.zoo").joinpath(family, f"{name}.yaml").read_text())


LLAVA = _preset("moe_llava", "micro-moe-llava")
DSVL2 = _preset("deepseek_vl2", "micro-deepseek-vl2")


def _problems(data):
    """The (path, message) pairs of the cross-field rules, or the pydantic errors."""
    with pytest.raises(ValidationError) as info:
        ModelSpec.model_validate(data)
    found = []
    for err in info.value.errors():
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, CrossFieldError):
            found += cause.problems
        else:
            found.append((err["loc"], err["msg"]))
    return found


def _edit(data, fn):
    data = copy.deepcopy(data)
    fn(data)
    return data


def test_micro_presets_validate():
    assert ModelSpec.model_validate(LLAVA).moe_layers() == [0, 2]
    assert ModelSpec.model_validate(DSVL2).moe_layers() == [1, 2]


@pytest.mark.parametrize(
    "layers, expected",
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("every_other", [0, 2, 4]),
        ("first_half", [0, 1, 2]),
        ("second_half", [3, 4, 5]),
        (FirstKDenseSpec(first_k_dense=1), [1, 2, 3, 4, 5]),
        ([4, 0, 4], [0, 4]),
    ],
)
def test_layer_patterns(layers, expected):
    assert moe_layer_indices(layers, 6) == expected


def test_top_k_above_pool_size():
    data = _edit(DSVL2, lambda d: d["moe"]["routes"][1]["router"].update(top_k=17))
    assert _problems(data) == [
        (("moe", "routes", 1, "router", "top_k"), "must be <= 16 (pool 'routed' has 16 experts)")
    ]


def test_missing_pool_suggests_the_close_name_once():
    data = _edit(LLAVA, lambda d: d["moe"]["routes"][0].update(pool="expert"))
    assert _problems(data) == [(("moe", "routes", 0, "pool"), "no pool named 'expert'; did you mean 'experts'?")]


def test_unused_pool():
    data = _edit(LLAVA, lambda d: d["moe"]["pools"].update(spare={"num_experts": 2, "intermediate_size": 8}))
    assert _problems(data) == [(("moe", "pools", "spare"), "pool 'spare' is not used by any route")]


def test_layer_index_past_num_layers():
    data = _edit(LLAVA, lambda d: d["moe"].update(layers=[0, 7]))
    assert _problems(data) == [(("moe", "layers", 1), "layer 7 is past language.num_layers (4)")]


def test_layer_index_listed_twice():
    data = _edit(LLAVA, lambda d: d["moe"].update(layers=[2, 0, 2, 7, 7]))
    assert _problems(data) == [(("moe", "layers", 2), "layer 2 is already listed at moe.layers[0]"),
                               (("moe", "layers", 3), "layer 7 is past language.num_layers (4)"),
                               (("moe", "layers", 4), "layer 7 is past language.num_layers (4)")]


def test_first_k_dense_past_num_layers():
    data = _edit(DSVL2, lambda d: d["moe"].update(layers={"first_k_dense": 3}))
    assert _problems(data) == [(("moe", "layers", "first_k_dense"), "must be < language.num_layers (3), got 3")]


def test_heads_must_divide_hidden():
    data = _edit(LLAVA, lambda d: d["language"].update(num_heads=3))
    ((loc, msg),) = _problems(data)
    assert loc == ("language",) and "hidden_size 128 is not divisible by num_heads 3" in msg


def test_vision_heads_must_divide_hidden():
    data = _edit(LLAVA, lambda d: d["vision"].update(num_heads=5))
    ((loc, msg),) = _problems(data)
    assert loc == ("vision", "clip") and "not divisible by num_heads 5" in msg


def test_unknown_token_selector():
    data = _edit(LLAVA, lambda d: d["moe"]["routes"][0].update(tokens="audio"))
    ((loc, msg),) = _problems(data)
    assert loc == ("moe", "routes", 0, "tokens") and "'all', 'text' or 'image'" in msg


def test_balancing_term_scoped_to_tokens_no_route_sees():
    def edit(d):
        d["moe"]["routes"][0]["tokens"] = "text"
        d["moe"]["balancing"][0]["tokens"] = "image"

    assert _problems(_edit(LLAVA, edit)) == [
        (("moe", "balancing", 0, "tokens"), "no routed (non-dense) route sees image tokens, so this term would be always 0")
    ]


def test_balancing_term_needs_a_routed_route_not_a_dense_one():
    def edit(d):
        d["moe"]["routes"][0]["router"] = {"type": "dense"}

    assert [p[0] for p in _problems(_edit(LLAVA, edit))] == [("moe", "balancing", 0, "tokens")]


def test_unknown_key_is_an_error():
    data = _edit(LLAVA, lambda d: d["moe"]["routes"][0]["router"].update(tpo_k=2))
    ((loc, msg),) = _problems(data)
    assert loc == ("moe", "routes", 0, "router", "deepspeed_top2", "tpo_k") and msg == "Extra inputs are not permitted"


def test_unknown_router_type():
    data = _edit(LLAVA, lambda d: d["moe"]["routes"][0]["router"].update(type="topp"))
    ((loc, msg),) = _problems(data)
    assert loc == ("moe", "routes", 0, "router") and "'topk', 'dense'" in msg


def test_mla_needs_deepseek_family():
    data = _edit(DSVL2, lambda d: d["language"].update(type="llama"))
    assert _problems(data) == [
        (("language", "attention", "type"), "mla attention needs language type deepseek_v2 or deepseek_v3, got llama")
    ]


def test_deepseek_v3_is_mla_only():
    data = _edit(DSVL2, lambda d: d["language"].update(type="deepseek_v3", attention={"type": "mha"}))
    assert _problems(data) == [(("language", "attention", "type"), "deepseek_v3 attention is mla only, got mha")]


def test_upcycle_needs_the_dense_ffn_size():
    data = _edit(LLAVA, lambda d: d["moe"]["pools"]["experts"].update(intermediate_size=128))
    ((loc, msg),) = _problems(data)
    assert loc == ("moe", "pools", "experts", "init") and "must equal language.intermediate_size (256)" in msg


def test_absurd_capacity_factor_is_refused():
    data = _edit(LLAVA, lambda d: d["moe"]["routes"][0]["router"]["capacity"].update(train=1000))
    ((loc, msg),) = _problems(data)
    assert loc[-1] == "train" and "less than or equal to 64" in msg


def test_token_ids_inside_the_vocabulary():
    data = _edit(LLAVA, lambda d: d.update(tokens={"image": 512}))
    assert _problems(data) == [(("tokens", "image"), "must be < language.vocab_size (512), got 512")]


def test_trainable_pattern_names_a_component():
    data = _edit(LLAVA, lambda d: d["training"]["stages"][0].update(trainable=["conector"]))
    assert _problems(data) == [
        (("training", "stages", 0, "trainable", 0),
         "unknown component 'conector' (expected one of vision, connector, language, moe); did you mean 'connector'?")
    ]


def test_stage_names_are_unique():
    data = _edit(LLAVA, lambda d: d["training"]["stages"][2].update(name="align"))
    assert _problems(data) == [
        (("training", "stages", 2, "name"), "stage 'align' is already named at training.stages[0]")]


def test_image_token_defaults_to_last_id():
    assert ModelSpec.model_validate(LLAVA).image_token_id == 511


def test_every_field_is_described_in_the_json_schema():
    undocumented = []

    def walk(name, node):
        for field, prop in node.get("properties", {}).items():
            if "description" not in prop:
                undocumented.append(f"{name}.{field}")

    schema = ModelSpec.model_json_schema()
    walk("ModelSpec", schema)
    for name, node in schema["$defs"].items():
        walk(name, node)
    assert undocumented == []


@pytest.mark.parametrize("router, path, says", [
    ({"type": "threshold", "threshold": 0.5, "max_experts": 5}, ("max_experts",), "must be <= 4 (pool 'experts' has 4 experts)"),
    ({"type": "dynamic_topk", "top_k": 2, "tail_top_k": 6}, ("tail_top_k",), "must be <= 4 (pool 'experts' has 4 experts)"),
    ({"type": "hierarchical", "groups": {"a": 2, "b": 1}, "top_k": 1}, ("groups",),
     "group sizes sum to 3, but pool 'experts' has 4 experts"),
    ({"type": "topk", "top_k": 2, "groups": {"num_groups": 3, "top_groups": 1}}, ("groups", "num_groups"),
     "must divide the pool's 4 experts (pool 'experts'), got 3"),
])
def test_every_router_type_must_fit_its_pool(router, path, says):
    data = _edit(LLAVA, lambda d: d["moe"]["routes"][0].update(router=router))
    assert _problems(data) == [(("moe", "routes", 0, "router") + path, says)]
