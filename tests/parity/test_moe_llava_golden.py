"""moebuild against MoE-LLaVA's own code (DeepSpeed 0.9.5's top2gating), through golden files.

tests/data/golden/moe_llava/<backbone>/ holds what tools/golden/moe_llava/make_golden.py wrote in
MoE-LLaVA's environment: the original state dict, config.json, the CLIP tower's config, and for a
text batch, an image+text batch in evaluation and the same batch in training (capacity 1.5, routers
skewed so that tokens are dropped): logits, the summed aux loss, the loss, and the Gumbel draw each
MoE layer made. The draws are fed to moebuild's `deepspeed_top2` routers, so both models take the
same second choices; everything else is computed here from the converted checkpoint.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moebuild
from moebuild.convert import checkpoints, moe_llava
from moebuild.model.pretrained import CheckpointError
from moebuild.moe.routers.deepspeed import DeepSpeedTop2Router
from moebuild.schemas import ModelSpec

from .test_deepseek_vl2_golden import set_field

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "moe_llava"
BACKBONES = ("stablelm", "phi")
IMAGE_TOKEN_INDEX = -200  # MoE-LLaVA's placeholder in input_ids (moellava/constants.py)
ATOL = 1e-5


def checkpoint_dir(backbone: str, tmp_path: Path) -> Path:
    """The checkpoint as released: config.json, the tower config and model.safetensors (no golden file)."""
    directory = tmp_path / backbone
    directory.mkdir()
    for name in ("config.json", "image_tower_config.json", "model.safetensors"):
        shutil.copy(GOLDEN / backbone / name, directory / name)
    return directory


@pytest.fixture(scope="module", params=BACKBONES)
def converted(request, tmp_path_factory):
    directory = checkpoint_dir(request.param, tmp_path_factory.mktemp("moe_llava"))
    spec, model = checkpoints.load_foreign("moe_llava", directory)
    return request.param, spec, model.eval(), load_file(GOLDEN / request.param / "golden.safetensors")


def feed_noise(model, golden: dict, case: str) -> None:
    """Each MoE layer's router adds the Gumbel draw DeepSpeed made in that layer for `case`."""
    routers = [m for m in model.modules() if isinstance(m, DeepSpeedTop2Router)]
    layers = model.spec.moe_layers()
    assert len(routers) == len(layers)
    for router, layer in zip(routers, layers):
        noise = golden[f"{case}.noise.layer{layer}"]
        router.sample_gumbel = lambda logits, noise=noise: noise.to(logits.dtype)


def expand_images(golden: dict, values: torch.Tensor, fill: int, patches: int) -> torch.Tensor:
    """MoE-LLaVA's one -200 per image -> moebuild's `patches` image tokens (prepare_inputs_labels_for_multimodal)."""
    rows = []
    for row, ids in zip(values.tolist(), golden["image.input_ids"].tolist()):
        rows.append([x for value, token in zip(row, ids) for x in ([fill] * patches if token == IMAGE_TOKEN_INDEX else [value])])
    return torch.tensor(rows)


def image_inputs(model, golden: dict) -> dict:
    vision = model.spec.vision
    patches = (vision.image_size // vision.patch_size) ** 2
    ids = expand_images(golden, golden["image.input_ids"], model.config.image_token_id, patches)
    return {"input_ids": ids, "pixel_values": golden["image.images"],
            "labels": expand_images(golden, golden["image_train.labels"], -100, patches)}


def test_spec_mirrors_the_checkpoint(converted):
    backbone, spec, _, _ = converted
    route = spec.moe.routes[0]
    assert spec.moe_layers() == [0, 2] and spec.moe.pools["experts"].num_experts == 4
    assert route.router.type == "deepspeed_top2" and not route.causal
    assert (route.router.capacity.train, route.router.capacity.eval, route.router.capacity.min) == (1.5, 2.0, 0)
    assert [(t.type, t.coef) for t in spec.moe.balancing] == [("switch_aux", 0.01)]
    assert spec.language.type == backbone and spec.vision.select_layer == -2
    assert spec.connector.type == "mlp" and spec.connector.depth == 2
    if backbone == "phi":
        assert spec.language.lm_head_bias is False and not spec.moe.pools["experts"].gated


def test_text_logits_and_aux_loss_match_the_original(converted):
    _, _, model, golden = converted
    feed_noise(model, golden, "text")
    with torch.no_grad():
        out = model(input_ids=golden["text.input_ids"], attention_mask=golden["text.attention_mask"],
                    output_aux_losses=True)  # MoE-LLaVA computes l_aux in evaluation too
    torch.testing.assert_close(out.logits, golden["text.logits"], atol=ATOL, rtol=0)
    # MoE-LLaVA's aux loss: router_aux_loss_coef * the sum of every MoE layer's l_aux
    torch.testing.assert_close(out.aux_losses["switch_aux"], golden["text.aux_loss"], atol=1e-7, rtol=0)
    torch.testing.assert_close(golden["text.aux_loss"], 0.01 * golden["text.l_aux"].sum(), atol=1e-7, rtol=0)


def test_image_logits_match_the_original_in_evaluation(converted):
    _, _, model, golden = converted
    inputs = image_inputs(model, golden)
    feed_noise(model, golden, "image_eval")
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], output_aux_losses=True)
    torch.testing.assert_close(out.logits, golden["image_eval.logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.aux_losses["switch_aux"], golden["image_eval.aux_loss"], atol=1e-7, rtol=0)


def test_training_forward_drops_and_matches_the_original(converted):
    """Training capacity (1.5) drops tokens here; logits, aux loss and loss still agree."""
    _, _, model, golden = converted
    inputs = image_inputs(model, golden)
    feed_noise(model, golden, "image_train")
    model.train()
    try:
        with torch.no_grad():
            out = model(**inputs, output_router_stats=True)
    finally:
        model.eval()
    dropped = [stats["all"]["dropped_fraction"] for layer in out.router_stats for stats in layer.stats.values()]
    assert max(dropped) > 0, "the case must exercise capacity dropping"
    torch.testing.assert_close(out.logits, golden["image_train.logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.aux_losses["switch_aux"], golden["image_train.aux_loss"], atol=1e-7, rtol=0)
    torch.testing.assert_close(out.loss, golden["image_train.loss"], atol=ATOL, rtol=0)


def test_round_trip_gives_the_original_back(converted):
    backbone, spec, model, _ = converted
    state = load_file(GOLDEN / backbone / "model.safetensors")
    config, state_back = moe_llava.from_moebuild(model.state_dict(), spec)
    assert state_back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(state_back[key], value), key
    original = json.loads((GOLDEN / backbone / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "image_projector_type",
                "mm_vision_select_layer", "mm_vision_select_feature"):
        assert config[key] == original[key], key
    assert {k: config["moe"][k] for k in ("moe_layers_idx", "num_experts", "capacity_factor", "eval_capacity_factor",
                                          "min_capacity", "router_aux_loss_coef", "top_k_experts")} == \
        {k: original["moe"][k] for k in ("moe_layers_idx", "num_experts", "capacity_factor", "eval_capacity_factor",
                                         "min_capacity", "router_aux_loss_coef", "top_k_experts")}
    again = ModelSpec.model_validate(moe_llava.spec_from_config(config, name=spec.name))
    assert again.model_dump(exclude={"description"}) == spec.model_dump(exclude={"description"})


def test_import_and_export_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from moebuild.cli import main

    source = checkpoint_dir("phi", tmp_path)
    run = CliRunner().invoke
    result = run(main, ["import", "moe_llava", str(source), "-o", str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    result = run(main, ["export", "moe_llava", str(tmp_path / "ours"), "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back, original = load_file(tmp_path / "back" / "model.safetensors"), load_file(source / "model.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    # the exported config carries its tower, so it imports again without image_tower_config.json
    assert checkpoints.spec_of("moe_llava", tmp_path / "back").vision == checkpoints.spec_of("moe_llava", source).vision


def test_every_problem_is_named_in_one_error(tmp_path):
    config = json.loads((GOLDEN / "phi" / "config.json").read_text())
    config["image_tower_config"] = json.loads((GOLDEN / "phi" / "image_tower_config.json").read_text())
    spec = ModelSpec.model_validate(moe_llava.spec_from_config(config, name="x"))
    state = load_file(GOLDEN / "phi" / "model.safetensors")
    del state["model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc2.bias"]
    del state["model.mm_projector.image_spatial_proj.0.weight"]
    state["lm_head.bias"] = torch.zeros(128)
    with pytest.raises(CheckpointError) as error:
        moe_llava.to_moebuild(state, spec)
    for name in ("deepspeed_experts.3.fc2.bias", "image_spatial_proj.0.weight", "left over", "lm_head.bias"):
        assert name in str(error.value), str(error.value)


@pytest.mark.parametrize("field, value, says", [
    (("moe", "use_residual"), True, "use_residual"),
    (("moe", "top_k_experts"), 1, "top_k_experts"),
    (("moe", "num_experts"), [4, 8], "num_experts"),
    (("image_projector_type",), "qformer2_64", "image_projector_type"),
    (("model_type",), "moe_llava_minicpm", "MiniCPM"),
    (("image_tower_config",), None, "LanguageBind_Image|image_tower_config.json"),
])
def test_configs_moebuild_cannot_mirror_are_refused(field, value, says):
    config = json.loads((GOLDEN / "stablelm" / "config.json").read_text())
    config["image_tower_config"] = json.loads((GOLDEN / "stablelm" / "image_tower_config.json").read_text())
    unmodified = ModelSpec.model_validate(moe_llava.spec_from_config(config, name="x"))
    assert unmodified.vision.image_size == 32  # the unmodified config converts
    set_field(config, field, value)
    with pytest.raises(CheckpointError, match=says):
        moe_llava.spec_from_config(config, name="x")


@pytest.mark.parametrize("preset", ["moe-llava-stablelm-1.6b", "moe-llava-phi2-2.7b", "moe-llava-qwen-1.8b",
                                    "micro-moe-llava"])
def test_zoo_presets_export_and_come_back(preset):
    """The published sizes as MoE-LLaVA configs, and back to the same architecture and routing."""
    spec = moebuild.load_spec(preset)
    again = ModelSpec.model_validate(moe_llava.spec_from_config(moe_llava.config_from_spec(spec), name=preset))
    assert (again.vision, again.connector) == (spec.vision, spec.connector)
    assert again.moe_layers() == spec.moe_layers() and again.moe.routes == spec.moe.routes
    assert again.moe.balancing == spec.moe.balancing
    assert {k: p.model_dump(exclude={"init"}) for k, p in again.moe.pools.items()} == \
        {k: p.model_dump(exclude={"init"}) for k, p in spec.moe.pools.items()}
    assert again.language.hidden_size == spec.language.hidden_size and again.language.type == spec.language.type
    assert moe_llava.untranslated(spec) == []


def test_ltdr_loads_the_one_gate_into_both_routes_and_exports_it(tmp_path):
    """LTDR checkpoints are MoE-LLaVA's: its text and image routes share the layer's one gate."""
    source = checkpoint_dir("stablelm", tmp_path)
    base = checkpoints.spec_of("ltdr", source)
    data = base.model_dump(exclude_none=True)
    data["moe"]["routes"] = [dict(data["moe"]["routes"][0], tokens="text"),
                             {"tokens": "image", "pool": "experts",
                              "router": {"type": "dynamic_topk", "top_k": 2, "tail_top_k": 4, "normalize": True}}]
    data["moe"]["balancing"] = [{"type": "load_balance", "coef": 0.01, "tokens": "text"}]
    ltdr = ModelSpec.model_validate(data)
    _, model = checkpoints.load_foreign("ltdr", source, ltdr)
    layer = model.language.model.layers[0].mlp
    assert torch.equal(layer.routes[0].router.weight, layer.routes[1].router.weight)
    config, state = moe_llava.from_moebuild(model.state_dict(), ltdr)
    assert torch.equal(state["model.layers.0.mlp.deepspeed_moe.gate.wg.weight"], layer.routes[0].router.weight)
    assert moe_llava.untranslated(ltdr) == ["route 1 (dynamic_topk over image tokens)",
                                            "balancing term load_balance over text tokens"]
    with torch.no_grad():
        layer.routes[1].router.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="routers differ"):
        moe_llava.from_moebuild(model.state_dict(), ltdr)


@pytest.mark.parametrize("fmt, system", [("ltdr", "LTDR"), ("moe_llava", "MoE-LLaVA")])
def test_refusals_name_the_format_imported(tmp_path, fmt, system):
    """LTDR shares MoE-LLaVA's converter; its refusals still say whose config or checkpoint it was."""
    from click.testing import CliRunner

    from moebuild.cli import main

    source = checkpoint_dir("stablelm", tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"image_projector_type": "qformer2_64"}))
    result = CliRunner().invoke(main, ["import", fmt, str(source), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output == (
        f"Error: {system} config: image_projector_type 'qformer2_64': moebuild has linear and mlpNx_gelu\n")
    (source / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["import", fmt, str(source), "--spec", "micro-deepseek-vl2",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.startswith(
        f"Error: micro-deepseek-vl2 does not map onto {system}'s model: pools "), result.output
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_rope_scaling_travels_in_the_original_spelling():
    spec = moebuild.load_spec("micro-moe-llava", ["language.rope_scaling={type: linear, factor: 2.0}"])
    config = moe_llava.config_from_spec(spec)
    assert config["rope_scaling"] == {"type": "linear", "factor": 2.0}
    assert ModelSpec.model_validate(moe_llava.spec_from_config(config, name="x")).language.rope_scaling == \
        spec.language.rope_scaling


def test_qwen_backbone_travels_in_qwen_v1_naming():
    """No golden file for the Qwen backbone (its code needs Qwen-1's own modeling file): the names,
    the fused c_attn (q rows, then k, then v) and w1 = up, w2 = gate, c_proj = down are checked, and
    the checkpoint comes back tensor for tensor."""
    tiny = ["language.hidden_size=64", "language.num_heads=4", "language.num_layers=2", "language.intermediate_size=96",
            "language.vocab_size=300", "moe.pools.experts.intermediate_size=96", "vision.hidden_size=32",
            "vision.num_layers=1", "vision.num_heads=2", "vision.intermediate_size=64", "vision.image_size=28"]
    spec = moebuild.load_spec("moe-llava-qwen-1.8b", tiny)
    model = moebuild.build(spec, seed=0)
    ours = model.state_dict()
    config, state = moe_llava.from_moebuild(ours, spec)
    assert config["model_type"] == "moe_llava_qwen" and config["intermediate_size"] == 2 * 96
    attn = "language.model.layers.1.self_attn."
    assert torch.equal(state["transformer.h.1.attn.c_attn.weight"],
                       torch.cat([ours[attn + f"{n}_proj.weight"] for n in "qkv"]))
    assert torch.equal(state["transformer.h.1.mlp.w2.weight"], ours["language.model.layers.1.mlp.gate_proj.weight"])
    gate_up = ours["language.model.layers.0.mlp.pools.experts.gate_up_proj"]
    assert torch.equal(state["transformer.h.0.mlp.deepspeed_moe.experts.deepspeed_experts.2.w1.weight"], gate_up[2, 96:])
    assert "transformer.mm_projector.image_spatial_proj.0.weight" in state and "transformer.wte.weight" in state
    again = ModelSpec.model_validate(moe_llava.spec_from_config(config, name=spec.name))
    back = moe_llava.to_moebuild(state, again)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())
