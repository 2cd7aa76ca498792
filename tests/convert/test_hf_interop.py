"""transformers' MoE models both ways: a tiny random checkpoint saved by transformers loads into the
spec `spec_from_config` writes and gives transformers' logits; `from_moebuild` writes it back as a
checkpoint `AutoModelForCausalLM` loads, with the same tensors and logits; the spec survives
config -> spec -> config. Five families: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import moebuild
from moebuild.convert import hf
from moebuild.model.pretrained import CheckpointError, read_safetensors_dir
from moebuild.schemas import ModelSpec

COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=128, max_position_embeddings=256,
              pad_token_id=3, bos_token_id=5, eos_token_id=7)  # not moebuild's defaults: both ways carry them
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)
DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, n_shared_experts=2,
                first_k_dense_replace=1)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=True,
                                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON | {"num_key_value_heads": 1}, head_dim=24, num_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=32),
    "deepseek_v2": lambda: DeepseekV2Config(**COMMON | MLA, **DEEPSEEK, q_lora_rank=None, routed_scaling_factor=1.5,
                                            topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "deepseek_v3": lambda: DeepseekV3Config(**COMMON | MLA, **DEEPSEEK, q_lora_rank=24, routed_scaling_factor=2.5,
                                            n_group=4, topk_group=2, norm_topk_prob=True,
                                            rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 0.707,
                                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 64,
                                                          "beta_fast": 32.0, "beta_slow": 1.0}),
}


def random_reference(model_type: str, directory) -> torch.nn.Module:
    """transformers' model with every weight random (routers too: they start at zero) and saved."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.02 if "norm" not in name else 0.1) + ("norm" in name))
            if ".gate.weight" in name or "shared_expert_gate" in name:
                param.mul_(50)  # routers far from uniform, so the choice of experts matters
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # negative too: dropped groups must stay dropped
                buffer.copy_(torch.randn_like(buffer) * 0.3)
    model.save_pretrained(directory)
    return model


def left_padded_batch():
    torch.manual_seed(1)
    ids_BS = torch.randint(0, COMMON["vocab_size"], (2, 9))
    mask_BS = torch.ones_like(ids_BS)
    mask_BS[0, :3] = 0
    return ids_BS, mask_BS


def imported(directory, model_type):
    config = json.loads((directory / "config.json").read_text())
    spec = ModelSpec.model_validate(hf.spec_from_config(config, name=f"tiny-{model_type}"))
    model = moebuild.build(spec)
    model.load_state_dict(hf.to_moebuild(read_safetensors_dir(directory), spec), strict=True)
    return spec, model.eval()


@pytest.fixture(params=sorted(CONFIGS))
def pair(request, tmp_path):
    ref = random_reference(request.param, tmp_path / "hf")
    spec, ours = imported(tmp_path / "hf", request.param)
    return request.param, ref, spec, ours, tmp_path


def logits(model, ids_BS, mask_BS):
    with torch.no_grad():
        return model(input_ids=ids_BS, attention_mask=mask_BS).logits


def test_import_gives_transformers_logits(pair):
    model_type, ref, spec, ours, _ = pair
    assert hf.model_type_of(spec) == model_type
    ids_BS, mask_BS = left_padded_batch()
    keep = mask_BS.bool()
    assert (logits(ours, ids_BS, mask_BS) - logits(ref, ids_BS, mask_BS))[keep].abs().max() <= 1e-5


def test_export_loads_in_transformers_with_the_same_tensors_and_logits(pair):
    model_type, ref, spec, ours, tmp_path = pair
    config, state = hf.from_moebuild(ours.state_dict(), spec)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    original = read_safetensors_dir(tmp_path / "hf")
    assert state.keys() == original.keys()
    assert all(torch.equal(state[key], original[key]) for key in state)

    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    ids_BS, mask_BS = left_padded_batch()
    keep = mask_BS.bool()
    assert (logits(back, ids_BS, mask_BS) - logits(ours, ids_BS, mask_BS))[keep].abs().max() <= 1e-5


def test_config_spec_config_round_trip(pair):
    model_type, ref, spec, _, _ = pair
    config = hf.config_from_spec(spec)
    again = ModelSpec.model_validate(hf.spec_from_config(config, name=spec.name))
    assert again == spec
    assert (spec.tokens.pad, spec.tokens.bos, spec.tokens.eos) == (3, 5, 7)
    assert tuple(config[f"{key}_token_id"] for key in ("pad", "bos", "eos")) == (3, 5, 7)
    for key, value in config.items():
        if key not in ("architectures", "rope_parameters"):
            assert getattr(ref.config, key) == pytest.approx(value), key


def test_balancing_coefficient_matches_at_balance():
    # router_aux_loss_coef 0.02, K = 2 pooled over L = 3 layers: 0.02 * 2 at balance = coef * 3
    spec = hf.spec_from_config(CONFIGS["mixtral"]().to_dict(), name="m")
    assert spec["moe"]["balancing"] == [{"type": "load_balance", "coef": pytest.approx(0.02 * 2 / 3)}]


def test_a_checkpoint_that_does_not_fit_names_every_problem(tmp_path):
    random_reference("qwen2_moe", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    spec = ModelSpec.model_validate(hf.spec_from_config(config, name="q"))
    state = read_safetensors_dir(tmp_path)
    del state["model.layers.0.mlp.experts.3.up_proj.weight"]
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    state["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        hf.to_moebuild(state, spec)
    message = str(info.value)
    assert "missing from the qwen2_moe checkpoint: model.layers.0.mlp.experts.3.up_proj.weight" in message
    assert "left over in the qwen2_moe checkpoint: model.layers.0.mlp.extra.weight" in message
    assert "mis-shaped: language.model.norm.weight (3,) (the spec's model has (64,))" in message


@pytest.mark.parametrize("change, reason", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'longrope'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "truncate": False}}, "truncate of yarn rope scaling"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"model_type": "gpt2"}, "not one moebuild imports"),
])
def test_configs_moebuild_cannot_say_are_refused(change, reason):
    config = CONFIGS["qwen2_moe"]().to_dict() | change
    with pytest.raises(CheckpointError, match=reason):
        hf.spec_from_config(config, name="q")


def test_specs_transformers_cannot_compute_are_refused():
    spec = moebuild.load_spec("micro-moe-llava")
    with pytest.raises(CheckpointError, match="vision tower"):
        hf.config_from_spec(spec)
    config = CONFIGS["mixtral"]().to_dict()
    data = hf.spec_from_config(config, name="m")
    data["moe"]["routes"][0] |= {"causal": False, "router": data["moe"]["routes"][0]["router"] | {"capacity": {"train": 1.25}}}
    with pytest.raises(CheckpointError, match="router differs: capacity"):
        hf.config_from_spec(ModelSpec.model_validate(data))


@pytest.mark.parametrize("model_type, kind", [("qwen2_moe", "linear"), ("deepseek_v3", "yarn")])
def test_rope_scaling_is_carried_both_ways(model_type, kind, tmp_path):
    """The scaled configs above reach the spec (and so the logits checks run with scaled rope)."""
    config = CONFIGS[model_type]().to_dict()
    spec = ModelSpec.model_validate(hf.spec_from_config(config, name="x"))
    assert spec.language.rope_scaling.type == kind and spec.language.rope_scaling.factor > 1
    back, _ = hf.from_moebuild(moebuild.build(spec, device="meta").state_dict(), spec)
    assert {k: v for k, v in back["rope_parameters"].items() if v is not None} == \
        {k: v for k, v in config["rope_parameters"].items() if v is not None}


def test_special_ids_are_read_as_the_config_has_them():
    config = CONFIGS["qwen3_moe"]().to_dict() | {"pad_token_id": None, "eos_token_id": [7]}
    spec = ModelSpec.model_validate(hf.spec_from_config(config, name="q"))
    assert (spec.tokens.bos, spec.tokens.eos) == (5, 7)
    assert "pad_token_id" not in hf.config_from_spec(spec)  # no pad in, no pad out: id 0 stays a token
    with pytest.raises(CheckpointError, match=r"eos_token_id \[7, 9\]: a spec has one"):
        hf.spec_from_config(config | {"eos_token_id": [7, 9]}, name="q")
    assert ModelSpec.model_validate(hf.spec_from_config(config | {"eos_token_id": None}, name="q")).tokens.eos is None
