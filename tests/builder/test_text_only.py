"""A spec without vision and connector is a text-only MoE language model: it validates, counts,
builds, trains, generates, saves and loads, and refuses what only a vision model has."""

import pytest
import torch

import moebuild
from moebuild.schemas import ModelSpec

TEXT = {
    "name": "micro-text",
    "language": {"type": "qwen2", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                 "attention": {"type": "gqa"}, "intermediate_size": 128, "vocab_size": 256},
    "moe": {
        "pools": {"experts": {"num_experts": 8, "intermediate_size": 32},
                  "shared": {"num_experts": 1, "intermediate_size": 64}},
        "routes": [{"pool": "experts", "router": {"type": "topk", "top_k": 2}},
                   {"pool": "shared", "router": {"type": "dense", "gate": "sigmoid"}}],
        "balancing": [{"type": "load_balance", "coef": 0.01}],
    },
}


def spec(**changes) -> ModelSpec:
    return ModelSpec.model_validate(TEXT | changes)


def errors(data: dict) -> list[str]:
    with pytest.raises(Exception) as info:
        ModelSpec.model_validate(data)
    return str(info.value)


def test_a_vision_section_needs_a_connector_and_the_reverse():
    vision = moebuild.load_spec("micro-moe-llava").vision.model_dump()
    assert "a vision section needs a connector section" in errors(TEXT | {"vision": vision})
    assert "a connector section needs a vision section" in errors(TEXT | {"connector": {"type": "linear"}})


def test_image_tokens_are_refused_in_a_text_only_spec():
    assert "has no image placeholder id" in errors(TEXT | {"tokens": {"image": 5}})
    routes = [{"tokens": "image", "pool": "experts", "router": {"type": "topk", "top_k": 2}},
              {"pool": "shared", "router": {"type": "dense"}}]
    assert "has no image tokens" in errors(TEXT | {"moe": TEXT["moe"] | {"routes": routes}})
    stages = {"stages": [{"name": "s", "trainable": ["connector"]}]}
    assert "has no connector" in errors(TEXT | {"training": stages})


def test_summary_has_only_the_language_component():
    report = moebuild.summarize(spec())
    assert list(report.components) == ["language"]
    assert report.total_params == report.language.total
    assert spec().image_token_id is None


def test_builds_trains_generates_and_round_trips(tmp_path):
    model = moebuild.build(spec(), seed=0)
    assert model.vision is None and model.connector is None and model.num_image_tokens == 0
    ids_BS = torch.randint(0, 256, (2, 9))
    ids_BS[0, 3] = 255  # the last id is an ordinary token here, not an image placeholder
    out = model(input_ids=ids_BS, labels=ids_BS)
    out.loss.backward()
    assert set(out.aux_losses) == {"load_balance"}
    assert model.language.lm_head.weight.grad is not None
    model.eval()
    generated = model.generate(input_ids=ids_BS, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 12)
    model.save_pretrained(tmp_path)
    loaded = moebuild.MoEVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids_BS).logits, model(input_ids=ids_BS).logits)


def test_pixels_and_a_processor_are_refused():
    model = moebuild.build(spec())
    with pytest.raises(ValueError, match="text-only model"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), pixel_values=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="text-only model"):
        moebuild.build_processor(spec())
