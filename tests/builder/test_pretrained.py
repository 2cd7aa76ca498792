"""`pretrained:` checkpoints: strict loading, and the dense FFN upcycled into every expert."""

import json

import pytest
import torch
from transformers import CLIPVisionModel, StableLmForCausalLM

import moebuild
from moebuild import build
from moebuild.model.pretrained import CheckpointError
from moebuild.model.vision import _vision_config
from moebuild.registry import language_hf_config


@pytest.fixture(scope="module")
def language_dir(tmp_path_factory):
    spec = moebuild.load_spec("micro-moe-llava")
    torch.manual_seed(1)
    dense = StableLmForCausalLM(language_hf_config(spec.language))
    path = tmp_path_factory.mktemp("stablelm")
    dense.save_pretrained(path)
    return path, dense.state_dict()


def test_language_checkpoint_loads_and_upcycles_the_dense_ffn(language_dir):
    path, dense = language_dir
    model = build(moebuild.load_spec("micro-moe-llava", overrides=[f"language.pretrained={path}"]))
    own = model.language.state_dict()
    for key, tensor in dense.items():
        if ".mlp." not in key or key.startswith("model.layers.1.") or key.startswith("model.layers.3."):
            assert torch.equal(own[key], tensor), key  # everything but the MoE layers' FFNs, as saved
    for layer in (0, 2):  # MoE layers: every expert is the layer's dense FFN
        pool = model.language.layers[layer].mlp.pools["experts"]
        gate, up, down = (dense[f"model.layers.{layer}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        for e in range(4):
            assert torch.equal(pool.gate_up_proj[e], torch.cat([gate, up]))
            assert torch.equal(pool.down_proj[e], down)


def test_a_checkpoint_that_does_not_fit_names_the_keys(language_dir, tmp_path):
    path, _ = language_dir
    spec = moebuild.load_spec("micro-moe-llava", overrides=[f"language.pretrained={path}", "language.num_layers=3"])
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.3\."):
        build(spec)
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(moebuild.SpecError, match="language.pretrained: .*holds no .safetensors files .*never loads"):
        moebuild.load_spec("micro-moe-llava", overrides=[f"language.pretrained={tmp_path}"])
    spec = moebuild.load_spec("micro-moe-llava")
    spec.language.pretrained = str(tmp_path)  # past the loader's check: the builder says the same
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        build(spec)


def test_vision_checkpoint_loads(tmp_path):
    spec = moebuild.load_spec("micro-moe-llava")
    v = spec.vision
    config = _vision_config("clip", True, image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                            intermediate_size=v.intermediate_size, hidden_act=v.hidden_act,
                            layer_norm_eps=v.layer_norm_eps)
    torch.manual_seed(2)
    tower = CLIPVisionModel(config)
    tower.save_pretrained(tmp_path)
    model = build(moebuild.load_spec("micro-moe-llava", overrides=[f"vision.pretrained={tmp_path}"]))
    for key, tensor in tower.state_dict().items():
        assert torch.equal(model.vision.vision_model.state_dict()[key], tensor), key


def test_vision_weights_under_a_full_clip_prefix_load(tmp_path):
    """Released CLIP checkpoints hold `vision_model.*` beside `text_model.*`."""
    from safetensors.torch import save_file

    model = build("micro-moe-llava")
    torch.manual_seed(3)
    state = {f"vision_model.{k}": torch.randn_like(v) for k, v in model.vision.vision_model.state_dict().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 4)
    save_file(state, tmp_path / "model.safetensors")
    loaded = build(moebuild.load_spec("micro-moe-llava", overrides=[f"vision.pretrained={tmp_path}"]))
    for key, tensor in loaded.vision.vision_model.state_dict().items():
        assert torch.equal(tensor, state[f"vision_model.{key}"]), key


@pytest.mark.parametrize("router", [
    {"type": "topk", "top_k": 2, "normalize": True},
    {"type": "deepspeed_top2", "eval_noise": False},  # MoE-LLaVA's gate, dropless: its kept gates renormalised
])
def test_upcycled_model_computes_what_the_dense_checkpoint_does(language_dir, router):
    """Every expert a copy of the dense FFN and the gates summing to 1: MoE-LLaVA's stage-3 start is
    the dense model, whatever the (random) router picks."""
    path, dense_state = language_dir
    route = {"tokens": "all", "pool": "experts", "causal": False, "router": router}
    spec = moebuild.load_spec("micro-moe-llava", overrides=[f"language.pretrained={path}",
                                                            f"moe.routes=[{json.dumps(route)}]"])
    model = build(spec).eval()
    dense = StableLmForCausalLM(language_hf_config(spec.language)).eval()
    dense.load_state_dict(dense_state)
    ids = torch.randint(3, 400, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=0)
    picks = model.language.layers[0].mlp.routes[0].router.weight
    assert picks.std() > 0  # the router is random, not a tie the test would pass through
