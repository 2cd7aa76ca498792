"""VisionTower against transformers' own CLIP / SigLIP vision models with the same weights."""

import pytest
import torch
from transformers import CLIPVisionModel, SiglipVisionModel

from moebuild.model.vision import VisionTower, build_vision_tower

TINY = dict(image_size=28, patch_size=14, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64)


def _tiny(kind, **kwargs):
    torch.manual_seed(0)
    return build_vision_tower(kind, **TINY, **kwargs)


def _reference(tower: VisionTower):
    cls = CLIPVisionModel if tower.has_cls else SiglipVisionModel
    ref = cls(tower.vision_model.config).eval()
    ref.load_state_dict(tower.vision_model.state_dict())
    return ref


@pytest.fixture
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, 28, 28)


def test_clip_penultimate_patch_matches_transformers(pixels):
    tower = _tiny("clip", select_layer=-2, select_feature="patch")
    ref = _reference(tower)
    expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    got = tower(pixels)
    assert got.shape == (2, 4, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_clip_cls_patch_keeps_cls_and_runs_only_needed_layers(pixels):
    tower = _tiny("clip", select_layer=1, select_feature="cls_patch")
    ref = _reference(tower)
    expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    calls = []
    for layer in tower.vision_model.encoder.layers:
        layer.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(tower(pixels), expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1 and tower.num_tokens == 5


def test_siglip_last_post_norm_matches_last_hidden_state(pixels):
    tower = _tiny("siglip", select_layer=-1, post_norm=True)
    assert tower.vision_model.head is not None  # built (counted) although never called
    ref = _reference(tower)
    torch.testing.assert_close(tower(pixels), ref(pixel_values=pixels).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_siglip_penultimate_without_norm(pixels):
    tower = _tiny("siglip", select_layer=-2)
    ref = _reference(tower)
    expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(tower(pixels), expected, atol=1e-5, rtol=1e-5)


def test_family_defaults_and_overrides():
    clip, siglip = _tiny("clip").vision_model.config, _tiny("siglip").vision_model.config
    assert (clip.hidden_act, clip.layer_norm_eps) == ("quick_gelu", 1e-5)
    assert (siglip.hidden_act, siglip.layer_norm_eps) == ("gelu_pytorch_tanh", 1e-6)
    tower = _tiny("siglip", use_head=False, layer_norm_eps=1e-3, hidden_act="gelu")
    assert not hasattr(tower.vision_model, "head")
    assert tower.vision_model.post_layernorm.eps == 1e-3
    assert tower.vision_model.config.hidden_act == "gelu"


def test_pretrained_round_trip(tmp_path, pixels):
    source = _tiny("siglip", select_layer=-1, post_norm=True)
    source.vision_model.save_pretrained(tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    loaded = build_vision_tower("siglip", **TINY, select_layer=-1, post_norm=True, pretrained=str(tmp_path))
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(loaded(pixels), source(pixels))


def test_pretrained_mismatch_is_one_readable_error(tmp_path):
    _tiny("clip").vision_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_hidden_layers: spec 2, checkpoint 3"):
        build_vision_tower("clip", **{**TINY, "num_layers": 2}, pretrained=str(tmp_path))
    _tiny("siglip").vision_model.save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match="vision_use_head: spec False, checkpoint True"):
        build_vision_tower("siglip", **TINY, use_head=False, pretrained=str(tmp_path / "siglip"))
    with pytest.raises(FileNotFoundError):
        build_vision_tower("clip", **TINY, pretrained=str(tmp_path / "missing"))


def test_frozen_tower_has_no_grads_and_stays_in_eval(pixels):
    tower = _tiny("clip")
    assert tower.frozen and not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.vision_model.training
    out = tower(pixels.requires_grad_())
    assert not out.requires_grad


def test_trainable_tower_gets_grads(pixels):
    tower = _tiny("clip", frozen=False)
    tower.train()
    assert tower.training
    tower(pixels).sum().backward()
    assert tower.vision_model.embeddings.patch_embedding.weight.grad is not None


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_meta_build_allocates_nothing(kind):
    # SigLIP-SO400M at full size: on meta this is instant and holds no storage.
    tower = build_vision_tower(
        kind, image_size=384, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16,
        intermediate_size=4304, select_layer=-1, post_norm=True, device="meta", dtype=torch.bfloat16,
    )
    assert all(t.is_meta for t in [*tower.parameters(), *tower.buffers()])
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    if kind == "siglip":
        head = sum(p.numel() for p in tower.vision_model.head.parameters())
        assert 15.0e6 < head < 15.5e6  # DeepSeek-VL2 counts the unused pooling head (~15.2M)
        assert tower.num_tokens == 729


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="siglip", select_feature="cls_patch"), "CLS"),
        (dict(kind="clip", select_layer=4), "out of range"),
        (dict(kind="vit"), "kind must be one of"),
        (dict(kind="clip", use_head=False), "SigLIP only"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_vision_tower(**TINY, **kwargs)
