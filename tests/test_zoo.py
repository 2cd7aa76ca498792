"""The zoo: every preset parses, says where it comes from, and counts to its system's published figures.

Golden integers are this project's own accounting (moebuild.accounting, itself checked against meta
builds of the modules in tests/builder/test_summary.py and test_model.py); the published figures
are the papers' and model cards', compared under each system's counting convention and quoting
(see moebuild.accounting.PUBLISHED).
"""

import math
import re
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
import torch

import moebuild
from moebuild import build
from moebuild.accounting import summarize
from moebuild.spec.loading import load_spec

ZOO = Path(__file__).resolve().parents[1] / "zoo"
PRESETS = sorted(path.stem for path in ZOO.glob("*/*.yaml"))
MICRO = [name for name in PRESETS if name.startswith("micro-")]

# preset: (total_params, active_params) as `moebuild summary` reports them.
GOLDEN = {
    "moe-llava-stablelm-1.6b": (3_200_124_928, 2_369_652_736),
    "moe-llava-qwen-1.8b": (3_364_126_720, 2_552_528_896),
    "moe-llava-phi2-2.7b": (5_609_680_896, 3_931_549_696),
    "deepseek-vl2-tiny": (3_370_501_440, 1_175_373_120),
    "deepseek-vl2-small": (16_148_349_504, 3_103_015_488),
    "deepseek-vl2-base": (27_480_132_160, 4_901_669_440),
    # LTDR: the image route's tail tokens take all 4 experts, so the image token is the most active one.
    "ltdr-stablelm-1.6b": (3_200_223_232, 3_200_124_928),
    "ltdr-phi2-2.7b": (5_609_844_736, 5_609_680_896),
    "vl-moe-stablelm-1.6b": (4_861_167_616, 2_369_652_736),
}

# preset: (convention, exact figures under it, the published figures). MoE-LLaVA quotes activated
# parameters only; DeepSeek-VL2's totals are its checkpoints' counts.
PUBLISHED = {
    "moe-llava-stablelm-1.6b": ("moe_llava", {"activated": 2_059_849_728}, {"activated": "2.0"}),
    "moe-llava-qwen-1.8b": ("moe_llava", {"activated": 2_242_725_888}, {"activated": "2.2"}),
    "moe-llava-phi2-2.7b": ("moe_llava", {"activated": 3_618_862_080}, {"activated": "3.6"}),
    "deepseek-vl2-tiny": ("deepseek_vl2", {"total": 3_370_501_440, "activated": 1_009_894_720},
                          {"total": "3.37", "activated": "1.0"}),
    "deepseek-vl2-small": ("deepseek_vl2", {"total": 16_148_349_504, "activated": 2_893_300_288},
                           {"total": "16.1", "activated": "2.8"}),
    "deepseek-vl2-base": ("deepseek_vl2", {"total": 27_480_132_160, "activated": 4_570_712_640},
                          {"total": "27.5", "activated": "4.5"}),
}


def _quoted(count: int, published: str, rounding) -> str:
    """`count` in billions at the published figure's precision: rounded (totals) or cut (activated)."""
    step = Decimal(published).as_tuple().exponent
    return str((Decimal(count) / Decimal(10**9)).quantize(Decimal(1).scaleb(step), rounding=rounding))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_and_cites_its_source(name):
    spec = load_spec(name)
    assert spec.name == name
    lines = (ZOO / moebuild.spec.presets.preset_family(name) / f"{name}.yaml").read_text().splitlines()
    assert lines[0].startswith(f"# {name}: ")
    comment = " ".join(line for line in lines if line.startswith("#"))
    assert re.search(r"\b(19|20)\d\d\b", comment), "cite the paper with its year"
    assert "arXiv:" in comment or '"' in comment, "name the paper (arXiv id or title)"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_parameter_counts(name):
    report = summarize(load_spec(name))
    assert (report.total_params, report.active_params) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_figures_under_the_systems_convention(name):
    convention, exact, published = PUBLISHED[name]
    figures = summarize(load_spec(name)).to_dict()["published"][convention]
    assert {key: figures[key] for key in exact} == exact
    for key, quoted in published.items():
        rounding = ROUND_FLOOR if key == "activated" else ROUND_HALF_UP
        assert _quoted(exact[key], quoted, rounding) == quoted, (key, exact[key], quoted)


def test_deepseek_vl2_small_activated_is_quoted_cut_not_rounded():
    # 2.893B: rounding gives 2.9B, the paper says 2.8B (the LLM's 2.45B, quoted 2.4B as DeepSeek-V2-Lite,
    # plus the ~0.43B SigLIP tower); the input embedding is left out, the LM head kept.
    spec = load_spec("deepseek-vl2-small")
    report = summarize(spec)
    activated = report.to_dict()["published"]["deepseek_vl2"]["activated"]
    assert activated == report.active_params - spec.language.vocab_size * spec.language.hidden_size
    language_only = report.language.active - report.embedding_params
    assert _quoted(language_only, "2.4", ROUND_FLOOR) == "2.4"
    assert _quoted(activated, "2.8", ROUND_HALF_UP) == "2.9"


def test_moe_llava_activated_is_the_language_model_with_two_of_four_experts():
    # StableLM-2-1.6B has 1,644,515,328 parameters (embedding and untied head 2 x 100352 x 2048, 24 layers
    # of q/k/v/o 4 x 2048^2 + qkv biases 3 x 2048, SwiGLU 3 x 2048 x 5632, two LayerNorms; final LayerNorm).
    # Its 12 MoE layers each add one more expert of the FFN's size and a 4 x 2048 router.
    stablelm = 2 * 100352 * 2048 + 24 * (4 * 2048**2 + 3 * 2048 + 3 * 2048 * 5632 + 4 * 2048) + 2 * 2048
    assert stablelm == 1_644_515_328
    expected = stablelm + 12 * (3 * 2048 * 5632 + 4 * 2048)
    figures = summarize(load_spec("moe-llava-stablelm-1.6b")).to_dict()["published"]["moe_llava"]
    assert figures["activated"] == expected


@pytest.mark.parametrize("name", MICRO)
def test_micro_preset_forward_and_generate(name):
    torch.manual_seed(0)
    model = build(name).eval()
    p, image = model.num_image_tokens, model.config.image_token_id
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, p), image), torch.tensor([[5, 6, 7]])], dim=1)
    side = model.spec.vision.image_size
    pixels = torch.randn(1, 3, side, side)
    out = model(input_ids=ids, pixel_values=pixels, labels=ids.masked_fill(ids == image, -100))
    assert torch.isfinite(out.loss)
    generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)


def test_tiled_micro_generates_from_processor_output():
    torch.manual_seed(0)
    model = build("micro-deepseek-vl2").eval()
    images = moebuild.build_processor(model.spec)([torch.randint(0, 256, (70, 150, 3), dtype=torch.uint8).numpy()])
    (tokens,) = images.num_image_tokens
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, tokens), model.config.image_token_id), torch.tensor([[9]])], 1)
    kwargs = dict(pixel_values=images.pixel_values, image_grids=images.tile_grids)
    generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, **kwargs)
    with torch.no_grad():  # greedy decoding with the cache equals the argmax of a full forward
        for step in range(3):
            logits = model(input_ids=generated[:, : ids.shape[1] + step], use_cache=False, **kwargs).logits
            assert logits[0, -1].argmax() == generated[0, ids.shape[1] + step]


def test_ltdr_presets_change_only_routing_and_balancing():
    for ltdr, base in [("ltdr-stablelm-1.6b", "moe-llava-stablelm-1.6b"), ("ltdr-phi2-2.7b", "moe-llava-phi2-2.7b")]:
        if ltdr not in PRESETS:
            pytest.skip(f"{ltdr} not in the zoo yet")
        a, b = load_spec(ltdr).model_dump(), load_spec(base).model_dump()
        for spec in (a, b):
            for key in ("name", "description"):
                spec.pop(key)
            spec["moe"].pop("routes"), spec["moe"].pop("balancing")
        assert a == b


def test_vl_moe_routes_each_modality_to_its_own_pool():
    spec = load_spec("vl-moe-stablelm-1.6b")
    assert {(route.tokens, route.pool) for route in spec.moe.routes} == {("image", "vision"), ("text", "text")}
    assert spec.moe_layers() == list(range(12))
    report = summarize(spec)
    assert report.language.parts["experts.vision"].total == report.language.parts["experts.text"].total
    assert math.isclose(report.language.parts["experts.text"].active, report.language.parts["experts.text"].total / 2)
