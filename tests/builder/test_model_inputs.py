"""Model inputs a user can get wrong: each is a ValueError saying what, never a silent result.
And checkpoints that do not fit their spec fail to load, naming the file and the tensor."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import moebuild
from moebuild import build
from moebuild.model.config import MoEVLMConfig
from moebuild.model.pretrained import CheckpointError
from moebuild.model.vlm import MoEVLMForConditionalGeneration


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build("micro-moe-llava").eval()


def prompt(model, batch=1, words=3):
    P, image = model.num_image_tokens, model.config.image_token_id
    ids = torch.tensor([[1] + [image] * P + [5 + i for i in range(words)]] * batch)
    side = model.spec.vision.image_size
    return ids, torch.randn(batch, 3, side, side)


def bad(model, message, **inputs):
    with pytest.raises(ValueError, match=message):
        model(**inputs)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_token_ids_outside_the_vocabulary(model):
    ids, pixels = prompt(model)
    for value in (512, -3):
        wrong = ids.clone()
        wrong[0, -1] = value
        bad(model, re.escape(f"input_ids[0, {ids.shape[1] - 1}] is {value}, outside the vocabulary (ids 0 to 511)"),
            input_ids=wrong, pixel_values=pixels)


def test_labels_outside_the_vocabulary_or_all_ignored(model):
    ids, pixels = prompt(model)
    for value, at in ((900, 2), (-5, 3)):
        labels = torch.full_like(ids, -100)
        labels[0, -1] = 7
        labels[0, at] = value
        with pytest.raises(ValueError, match=re.escape(f"labels[0, {at}] is {value}, outside the vocabulary (ids 0 "
                                                       "to 511, or -100 where no loss is taken)")):
            model(input_ids=ids, pixel_values=pixels, labels=labels)  # before: IndexError from cross_entropy
    with pytest.raises(ValueError, match="every label after the first is -100: no token to predict"):
        model(input_ids=ids, pixel_values=pixels, labels=torch.full_like(ids, -100))  # before: a silent nan loss
    labels = torch.full_like(ids, -100)
    labels[0, -1] = 7
    assert torch.isfinite(model(input_ids=ids, pixel_values=pixels, labels=labels).loss)


def test_placeholders_and_pictures_must_come_together(model):
    ids, pixels = prompt(model)
    bad(model, "input_ids hold 16 image placeholder tokens .id 511. but no pixel_values", input_ids=ids)
    text_only = ids[:, -3:]
    bad(model, "pixel_values hold 1 image.s. but input_ids have no image placeholder tokens",
        input_ids=text_only, pixel_values=pixels)


def test_placeholders_without_pictures_pass_only_as_a_sampled_decode_token(model):
    ids, pixels = prompt(model)
    cache = model(input_ids=ids, pixel_values=pixels).cache
    image = model.config.image_token_id
    model(input_ids=torch.tensor([[image]]), cache=cache)  # a decode step that sampled the placeholder id
    with pytest.raises(ValueError, match="image placeholder tokens .* but no pixel_values"):
        model(input_ids=torch.tensor([[7] + [image] * 16 + [8]]), cache=cache)  # a second turn's picture


def test_empty_inputs(model):
    bad(model, "input_ids is empty", input_ids=torch.zeros(1, 0, dtype=torch.long))
    bad(model, "input_ids is empty", input_ids=torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="give input_ids"):
        model()


@pytest.mark.parametrize("shape", [(1, 1, 56, 56), (1, 3, 64, 64), (3, 56, 56), (0, 3, 56, 56)])
def test_pictures_of_the_wrong_shape(model, shape):
    ids, _ = prompt(model)
    bad(model, re.escape("pixel_values must be [images, 3, 56, 56]") + ".*" + re.escape(f"got shape {shape}"),
        input_ids=ids, pixel_values=torch.randn(shape))


def test_mask_and_labels_must_match_the_ids(model):
    ids, pixels = prompt(model, batch=2)
    with pytest.raises(ValueError, match=re.escape("attention_mask has shape (2, 5), expected (2, 20)")):
        model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("labels have shape (2, 19), expected (2, 20)")):
        model(input_ids=ids, pixel_values=pixels, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        model(input_ids=ids.float())


def test_valid_inputs_still_run_and_generate(model):
    ids, pixels = prompt(model, batch=2)
    out = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), labels=ids)
    assert torch.isfinite(out.loss)
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 3)


def test_a_checkpoint_without_its_config_or_with_a_renamed_tensor_fails_to_load(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights["language.lm_head.renamed"] = weights.pop("language.lm_head.weight")
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors does not fit its spec; missing: language\.lm_head\.weight; "
                                         r"unexpected: language\.lm_head\.renamed"):
        MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_a_checkpoint_with_a_mis_shaped_tensor_fails_to_load(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["spec"]["language"]["vocab_size"] = 640
    del config["vocab_size"], config["image_token_id"]  # derived from the spec, so they must agree with it
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mis-shaped: language\.(lm_head|model\.embed_tokens)\.weight"):
        MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_a_directory_whose_parts_disagree_or_cannot_be_read_is_one_clear_error(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_size": 256}))
    with pytest.raises(CheckpointError, match=r"config.json disagrees with its own spec: hidden_size 256 \(its spec: \d+\)"):
        MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="the config disagrees with its own spec: vocab_size 9"):
        MoEVLMConfig(spec=config["spec"], vocab_size=9)  # the config class alone refuses it too
    config_path.write_text(json.dumps(config))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors \\(a `moebuild compile --device meta` directory"):
        MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_loading_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    import moebuild.model.memory_budget as budget

    moebuild.model.vlm.build_and_save(moebuild.load_spec("micro-moe-llava"), tmp_path / "m")
    monkeypatch.setattr(budget, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(CheckpointError, match=r"micro-moe-llava needs 0.0 GiB .* but 0.0 GiB of cpu memory"):
        MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "m")
