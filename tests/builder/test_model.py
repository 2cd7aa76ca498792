"""The compiled VLM end to end, for every micro preset: build, forward, loss, backward, generate,
save, load; and the spec-only summary against the meta-device build of every preset."""

import pytest
import torch

import moebuild
from moebuild import build, build_processor
from moebuild.accounting import summarize
from moebuild.model.vlm import MoEVLMForConditionalGeneration

MICRO = ["micro-moe-llava", "micro-deepseek-vl2", "micro-ltdr"]


def _inputs(model, batch=2, text=5, seed=0):
    """A batch of prompts `bos, <image> x P, text...` with sample images, labels on the text."""
    g = torch.Generator().manual_seed(seed)
    side = model.spec.vision.image_size
    pixels = torch.randn(batch, 3, side, side, generator=g)
    P, image_id = model.num_image_tokens, model.config.image_token_id
    words = torch.randint(3, image_id, (batch, text), generator=g)
    ids = torch.cat([torch.full((batch, 1), 1), torch.full((batch, P), image_id), words], dim=1)
    labels = ids.masked_fill(ids == image_id, -100)
    return ids, pixels, labels


@pytest.fixture(scope="module", params=MICRO)
def compiled(request, tmp_path_factory):
    torch.manual_seed(0)
    model = build(request.param)
    out_dir = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out_dir)
    return model, out_dir


def test_forward_loss_includes_every_balancing_term_and_reaches_routers_and_experts(compiled):
    model, _ = compiled
    model.train()
    ids, pixels, labels = _inputs(model)
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert torch.isfinite(out.loss)
    assert set(out.aux_losses) == {term.type for term in model.spec.moe.balancing}
    torch.testing.assert_close(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    model.zero_grad()
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    router = [n for n in grads if "router" in n]
    experts = [n for n in grads if "pools" in n]
    assert router and experts
    for name in router + experts:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert all(p.grad is None for p in model.vision.parameters())  # frozen tower


def test_image_features_land_at_the_placeholders(compiled):
    model, _ = compiled
    model.eval()
    ids, pixels, _ = _inputs(model, batch=1)
    embeds = model.merge_image_features(ids, model.get_input_embeddings()(ids), pixels)
    is_image = ids[0] == model.config.image_token_id
    torch.testing.assert_close(embeds[0, is_image], model.image_features(pixels)[0])
    torch.testing.assert_close(embeds[0, ~is_image], model.get_input_embeddings()(ids)[0, ~is_image])


def test_image_token_count_mismatch_is_a_clear_error(compiled):
    model, _ = compiled
    ids, pixels, _ = _inputs(model, batch=1)
    with pytest.raises(ValueError, match="image tokens but 2 image"):
        model(input_ids=ids, pixel_values=torch.cat([pixels, pixels]))


def test_save_load_round_trip_is_bit_exact(compiled):
    model, out_dir = compiled
    assert {p.name for p in out_dir.iterdir()} >= {"config.json", "model.safetensors", "spec.yaml"}
    assert moebuild.load_spec(out_dir / "spec.yaml") == model.spec
    loaded = MoEVLMForConditionalGeneration.from_pretrained(out_dir).eval()
    model.eval()
    saved, reloaded = model.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, reloaded[name]), name
    ids, pixels, labels = _inputs(model)
    with torch.no_grad():
        torch.manual_seed(0)  # MoE-LLaVA's gate samples Gumbel noise at evaluation too
        before = model(input_ids=ids, pixel_values=pixels, labels=labels)
        torch.manual_seed(0)
        after = loaded(input_ids=ids, pixel_values=pixels, labels=labels)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.loss, after.loss)


def test_generation_with_cache_equals_full_recompute(compiled):
    model, _ = compiled
    model.eval()
    noisy = [m for m in model.modules() if getattr(m, "eval_noise", False)]
    for router in noisy:  # MoE-LLaVA's gate samples noise at evaluation: compare without it
        router.eval_noise = False
    try:
        ids, pixels, _ = _inputs(model, batch=1)
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 4)
        # Greedy decoding with the KV cache picks the argmax of a full forward at every step.
        with torch.no_grad():
            for step in range(4):
                prefix = out[:, : ids.shape[1] + step]
                logits = model(input_ids=prefix, pixel_values=pixels, use_cache=False).logits
                assert logits[0, -1].argmax() == out[0, ids.shape[1] + step]
    finally:
        for router in noisy:
            router.eval_noise = True


@pytest.mark.parametrize("name", moebuild.list_presets())
def test_summary_equals_the_meta_build(name):
    spec = moebuild.load_spec(name)
    model = build(spec, device="meta")
    report = summarize(spec)
    counts = {
        "vision": sum(p.numel() for p in model.vision.parameters()),
        "connector": sum(p.numel() for p in model.connector.parameters()),
        "language": sum(p.numel() for p in model.language.parameters()),
    }
    assert counts == {key: report.components[key].total for key in counts}
    assert sum(counts.values()) == report.total_params


@pytest.mark.parametrize("name", moebuild.list_presets())
def test_meta_build_allocates_nothing(name):
    model = build(name, device="meta")
    assert all(t.is_meta for t in model.parameters())
    assert all(t.is_meta for t in model.buffers() if t is not None)


def test_processor_gives_the_model_its_image_token_count():
    model = build("micro-moe-llava")
    processor = build_processor(model.spec)
    image = (torch.rand(40, 70, 3) * 255).to(torch.uint8).numpy()
    images = processor([image])
    assert images.num_image_tokens == [model.num_image_tokens]
    assert images.pixel_values.shape == (1, 3, 56, 56)


def test_stage_training_freezes_what_the_stage_does_not_name():
    model = build("micro-moe-llava")
    counts = model.trainable_for_stage("moe")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable)
    assert counts["moe"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    counts = model.trainable_for_stage("align")
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"connector"}


def test_stage_pattern_that_matches_nothing_is_an_error():
    model = build(moebuild.load_spec("micro-moe-llava", overrides=["training.stages.2.trainable=[language.*.moe]"]))
    with pytest.raises(ValueError, match=r"training stage 'moe': language.\*.moe matches no parameter"):
        model.trainable_for_stage("moe")


def test_upcycled_experts_start_identical():
    model = build("micro-moe-llava")
    pool = model.language.layers[0].mlp.pools["experts"]
    assert torch.equal(pool.gate_up_proj[0], pool.gate_up_proj[3])
    assert not torch.equal(model.language.layers[0].mlp.pools["experts"].gate_up_proj,
                           model.language.layers[2].mlp.pools["experts"].gate_up_proj)


@pytest.mark.parametrize("name", [n for n in moebuild.list_presets() if moebuild.load_spec(n).training])
def test_every_preset_stage_trains_something_it_names(name):
    model = build(name, device="meta")
    for stage in model.spec.training.stages:
        counts = model.trainable_for_stage(stage.name)
        assert sum(counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_build_sets_no_process_state():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = build("micro-moe-llava", dtype="bfloat16", seed=0)
    assert torch.equal(torch.get_rng_state(), before) and torch.get_default_dtype() == torch.float32
    assert model.language.lm_head.weight.dtype == torch.bfloat16
    assert model.language.model.rotary_emb.inv_freq.dtype == torch.float32  # as transformers keeps it
    again = build("micro-moe-llava", dtype="bfloat16", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_tied_embeddings_stay_tied_through_build_save_and_load(tmp_path):
    spec = moebuild.load_spec("micro-moe-llava", ["+language.tie_word_embeddings=true"])
    model = build(spec, seed=0)
    assert model.language.lm_head.weight is model.language.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == summarize(spec).total_params
    model.save_pretrained(tmp_path)
    loaded = MoEVLMForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.language.lm_head.weight is loaded.language.embed_tokens.weight
    assert torch.equal(loaded.language.lm_head.weight, model.language.lm_head.weight)


def test_balancing_terms_are_computed_when_a_loss_is_wanted():
    """Training or labels: aux_losses computed (and in the loss); plain inference and generation: none."""
    model = build("micro-moe-llava").eval()
    ids = torch.randint(3, 400, (1, 6))
    with torch.no_grad():
        assert model(input_ids=ids).aux_losses == {}
        with_labels = model(input_ids=ids, labels=ids)
        asked = model(input_ids=ids, output_aux_losses=True)
    assert set(with_labels.aux_losses) == set(asked.aux_losses) == {"switch_aux"}
    torch.testing.assert_close(with_labels.loss, with_labels.lm_loss + with_labels.aux_losses["switch_aux"])
    model.train()
    assert set(model(input_ids=ids).aux_losses) == {"switch_aux"}
