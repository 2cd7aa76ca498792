"""moebuild against DeepSeek-VL2's own code, through golden files (fp32, max abs diff <= 1e-5).

tests/data/golden/deepseek_vl2/<variant>/ holds what tools/golden/deepseek_vl2/make_golden.py wrote
in DeepSeek-VL2's environment: the original `DeepseekVLV2ForCausalLM` state dict and config.json
(tiny: plain MHA; small: MLA with q/kv compression; base: MLA with noaux_tc sigmoid routing, a
correction bias and 4 groups), and its logits for a text-only batch and for a batch of tiled
pictures (global view + local tiles, image_newline, view_seperator). Here the checkpoint goes
through `moebuild.convert.deepseek_vl2` into the model its config implies, loaded strictly.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moebuild
from moebuild.convert import deepseek_vl2
from moebuild.model.pretrained import CheckpointError
from moebuild.model.vlm import build
from moebuild.schemas import ModelSpec

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "deepseek_vl2"
VARIANTS = ("tiny", "small", "base")
ATOL = 1e-5


def load_variant(variant: str):
    directory = GOLDEN / variant
    config = json.loads((directory / "config.json").read_text())
    spec = ModelSpec.model_validate(deepseek_vl2.spec_from_config(config, name=f"golden-deepseek-vl2-{variant}"))
    return config, spec, load_file(directory / "model.safetensors"), load_file(directory / "golden.safetensors")


def moebuild_images(golden: dict) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The original's batched `images` / `images_spatial_crop` as moebuild's views and grids."""
    views, grids = [], []
    for images, crops in zip(golden["image.images"], golden["image.images_spatial_crop"]):
        pictures = [(int(c), int(r)) for c, r in crops if c * r > 0]  # (width tiles, height tiles)
        grids += pictures
        views.append(images[: sum(c * r + 1 for c, r in pictures)])  # global view + tiles, per picture
    return torch.cat(views), grids


@pytest.fixture(scope="module", params=VARIANTS)
def converted(request):
    config, spec, state, golden = load_variant(request.param)
    model = build(spec).eval()
    model.load_state_dict(deepseek_vl2.to_moebuild(state, spec), strict=True)
    return request.param, config, spec, state, golden, model


def test_spec_mirrors_the_released_variant(converted):
    variant, _, spec, _, _, _ = converted
    router = spec.moe.routes[1].router
    assert spec.language.attention.type == {"tiny": "mha", "small": "mla", "base": "mla"}[variant]
    if variant == "small":
        assert spec.language.attention.q_lora_rank is not None
    if variant == "base":
        assert (router.score, router.bias, router.normalize, router.scale) == ("sigmoid", True, True, 2.0)
        assert (router.groups.rank_by, router.groups.dropped_score) == ("top2_sum", "zero")
        assert router.groups.num_groups == 4
    assert spec.vision.tiling is not None and spec.connector.type == "downsample_mlp"


def test_text_logits_match_the_original(converted):
    *_, golden, model = converted
    with torch.no_grad():
        logits = model(input_ids=golden["text.input_ids"]).logits
    torch.testing.assert_close(logits, golden["text.logits"], atol=ATOL, rtol=0)


def test_tiled_image_logits_match_the_original(converted):
    *_, golden, model = converted
    pixel_values, grids = moebuild_images(golden)
    ids = golden["image.input_ids"]
    assert torch.equal(ids == model.config.image_token_id, golden["image.images_seq_mask"])
    with torch.no_grad():
        torch.testing.assert_close(model.vision(pixel_values), golden["image.vision_features"], atol=ATOL, rtol=0)
        embeds = model.merge_image_features(ids, model.language.embed_tokens(ids), pixel_values, grids)
        torch.testing.assert_close(embeds, golden["image.inputs_embeds"], atol=ATOL, rtol=0)
        logits = model(input_ids=ids, pixel_values=pixel_values, image_grids=grids).logits
    torch.testing.assert_close(logits, golden["image.logits"], atol=ATOL, rtol=0)


def test_round_trip_gives_the_original_back(converted):
    _, config, spec, state, _, model = converted
    config_back, state_back = deepseek_vl2.from_moebuild(model.state_dict(), spec)
    assert state_back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(state_back[key], value), key
    again = ModelSpec.model_validate(deepseek_vl2.spec_from_config(config_back, name=spec.name))
    assert again == spec


def test_every_problem_is_named_in_one_error():
    _, spec, state, _ = load_variant("base")
    broken = dict(state)
    del broken["language.model.layers.1.mlp.experts.3.up_proj.weight"]
    del broken["vision.blocks.0.attn.qkv.bias"]
    broken["language.model.layers.2.mlp.gate.e_score_correction_bias"] = torch.zeros(3)
    broken["language.model.layers.9.mlp.gate.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        deepseek_vl2.to_moebuild(broken, spec)
    message = str(error.value)
    for name in ("language.model.layers.1.mlp.experts.3.up_proj.weight", "vision.blocks.0.attn.qkv.bias",
                 "language.model.layers.9.mlp.gate.weight", "routes.1.router.e_score_correction_bias (3,)"):
        assert name in message, message


@pytest.mark.parametrize("field, value, says", [
    (("tile_tag",), "1D", "tile_tag"),
    (("global_view_pos",), "tail", "global_view_pos"),
    (("language_config", "topk_method"), "gready", "topk_method"),  # the original's default typo
    (("language_config", "rope_scaling"), {"type": "longrope", "factor": 4.0}, "rope_scaling: rope_type 'longrope'"),
    (("projector_config", "mlp_ratio"), 2, "mlp_ratio"),
    (("candidate_resolutions",), [[42, 42], [84, 84]], "candidate_resolutions"),
])
def test_configs_moebuild_cannot_mirror_are_refused(field, value, says):
    config = json.loads((GOLDEN / "small" / "config.json").read_text())
    set_field(config, field, value)
    with pytest.raises(CheckpointError, match=says):
        deepseek_vl2.spec_from_config(config, name="x")


def set_field(config: dict, field: tuple[str, ...], value) -> None:
    """config[field[0]][field[1]]... = value."""
    for key in field[:-1]:
        config = config[key]
    config[field[-1]] = value


def test_left_out_fields_take_the_original_defaults():
    """Released configs omit defaults (Small has no vocab_size: DeepseekV2Config's 102400)."""
    config = json.loads((GOLDEN / "small" / "config.json").read_text())
    del config["language_config"]["vocab_size"]
    assert "depth" not in config["projector_config"]  # MlpProjectorConfig's default, 2
    data = deepseek_vl2.spec_from_config(config, name="x")
    assert data["language"]["vocab_size"] == 102400 and data["connector"]["depth"] == 2


@pytest.mark.parametrize("preset", ["deepseek-vl2-tiny", "deepseek-vl2-small", "deepseek-vl2-base", "micro-deepseek-vl2"])
def test_zoo_presets_export_and_come_back(preset):
    """The published sizes as original configs, and back to the same model (None = the family default)."""
    spec = moebuild.load_spec(preset)
    config = deepseek_vl2.config_from_spec(spec)
    again = ModelSpec.model_validate(deepseek_vl2.spec_from_config(config, name=preset))
    assert (again.vision, again.connector) == (spec.vision, spec.connector)
    defaults = {"head_dim": spec.language.hidden_size // spec.language.num_heads, "hidden_act": "silu", "qkv_bias": False}
    ours, theirs = spec.language.model_dump(), again.language.model_dump()
    assert {k: defaults[k] if v is None and k in defaults else v for k, v in ours.items()} == \
        {k: defaults[k] if v is None and k in defaults else v for k, v in theirs.items()}
    assert again.moe_layers() == spec.moe_layers() and again.moe.pools == spec.moe.pools
    assert again.moe.balancing == spec.moe.balancing
    if preset == "deepseek-vl2-base":  # exported as loaded: DeepSeek-VL2's noaux_tc gate cannot train
        assert deepseek_vl2.untranslated(spec) == ["correction-bias update_rate 0.001"]


@pytest.mark.parametrize("variant", ["tiny", "small"])  # base: MoEGate's noaux_tc runs in eval mode only
def test_training_losses_match_the_original(variant):
    """LM loss and the summed sequence-level aux losses (MoEGate's alpha * loss per MoE layer)."""
    _, spec, state, golden = load_variant(variant)
    model = build(spec)
    model.load_state_dict(deepseek_vl2.to_moebuild(state, spec), strict=True)
    model.train()
    pixel_values, grids = moebuild_images(golden)
    with torch.no_grad():
        for case, extra in (("text", {}), ("image", {"pixel_values": pixel_values, "image_grids": grids})):
            ids = golden[f"{case}.input_ids"]
            out = model(input_ids=ids, labels=ids, **extra)
            torch.testing.assert_close(out.lm_loss, golden[f"{case}.train_lm_loss"], atol=ATOL, rtol=0)
            torch.testing.assert_close(out.aux_losses["seq_aux"], golden[f"{case}.train_aux_loss"], atol=1e-7, rtol=0)
