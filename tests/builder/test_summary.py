"""moebuild.accounting against the parameter counts of the modules themselves, built on the meta device.

Vision towers and decoders are transformers' own classes (the ones moebuild wraps), connectors
moebuild's; a decoder is built dense and split by parameter name into the summary's parts. Expert
pools are moebuild's `ExpertPool`, routers the modules moebuild builds for each route.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    StableLmConfig,
    StableLmForCausalLM,
)

from moebuild.accounting import BYTES_PER_DTYPE, summarize
from moebuild.cli import summary_table
from moebuild.model.compat import CACHE_NAME
from moebuild.model.connectors import CONNECTORS
from moebuild.model.tiling import TiledConnector
from moebuild.moe.experts import ExpertPool
from moebuild.registry import build_module
from moebuild.schemas import ModelSpec
from moebuild.spec.loading import load_spec

ZOO = Path(__file__).resolve().parents[2] / "zoo"
PRESETS = sorted(path.stem for path in ZOO.glob("*/*.yaml"))


def _numel(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------- references built on meta


def _vision_reference(vision) -> int:
    numbers = dict(image_size=vision.image_size, patch_size=vision.patch_size, hidden_size=vision.hidden_size,
                   num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                   intermediate_size=vision.intermediate_size)
    with torch.device("meta"):
        if vision.type == "clip":
            return _numel(CLIPVisionModel(CLIPVisionConfig(**numbers)).parameters())
        return _numel(SiglipVisionModel(SiglipVisionConfig(**numbers, vision_use_head=vision.use_head)).parameters())


def _connector_reference(spec: ModelSpec) -> int:
    node = spec.connector.model_dump()
    kind = node.pop("type")
    with torch.device("meta"):
        module = CONNECTORS[kind](spec.vision.hidden_size, spec.language.hidden_size, **node)
        if spec.vision.tiling is not None:
            module = TiledConnector(module, spec.language.hidden_size, global_view=spec.vision.tiling.global_view)
    return _numel(module.parameters())


def _decoder(lang):
    """The family's dense transformers CausalLM with the spec's numbers (DeepSeek mha is LlamaAttention)."""
    common = dict(hidden_size=lang.hidden_size, num_hidden_layers=lang.num_layers, num_attention_heads=lang.num_heads,
                  num_key_value_heads=lang.num_kv_heads or lang.num_heads, intermediate_size=lang.intermediate_size,
                  vocab_size=lang.vocab_size, tie_word_embeddings=lang.tie_word_embeddings)
    head = {"head_dim": lang.head_dim} if lang.head_dim else {}
    bias = bool(lang.qkv_bias)
    if lang.attention.type == "mla":
        mla = lang.attention.model_dump(exclude={"type"})
        config_cls, model_cls = {"deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
                                 "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}[lang.type]
        return model_cls(config_cls(**common, **mla, attention_bias=bias, first_k_dense_replace=lang.num_layers))
    if lang.type in ("llama", "deepseek_v2"):
        return LlamaForCausalLM(LlamaConfig(**common, **head, attention_bias=bias))
    if lang.type == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, **head))
    if lang.type == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, **head, attention_bias=bias))
    if lang.type == "stablelm":
        return StableLmForCausalLM(StableLmConfig(**common, use_qkv_bias=bias, qk_layernorm=False))
    return PhiForCausalLM(PhiConfig(**common))


def _part_of(name: str, moe_layers: set[int]) -> str | None:
    if name.startswith("model.embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return None if int(name.split(".")[2]) in moe_layers else "dense_ffn"
    return "norms"


def _language_reference(spec: ModelSpec) -> dict[str, int]:
    """Parameters of the dense decoder by part, the FFNs of MoE layers left out (tied weights once)."""
    with torch.device("meta"):
        model = _decoder(spec.language)
    parts = dict.fromkeys(("embedding", "attention", "norms", "dense_ffn", "lm_head"), 0)
    moe_layers = set(spec.moe_layers())
    for name, param in model.named_parameters():
        part = _part_of(name, moe_layers)
        if name == "lm_head.bias" and spec.language.lm_head_bias is False:
            continue  # transformers' Phi always has it; MoE-LLaVA's Phi-2 head has none
        if part is not None:
            parts[part] += param.numel()
    return parts


def _moe_reference(spec: ModelSpec) -> dict[str, int]:
    if spec.moe is None:
        return {}
    h, n_moe = spec.language.hidden_size, len(spec.moe_layers())
    parts = {}
    for name, pool in spec.moe.pools.items():
        with torch.device("meta"):
            module = ExpertPool(pool.num_experts, h, pool.intermediate_size, pool.activation, pool.gated, pool.bias)
        parts[f"experts.{name}"] = n_moe * _numel(module.parameters())
    with torch.device("meta"):
        routers = [build_module(route.router, hidden_size=h, num_experts=spec.moe.pools[route.pool].num_experts)
                   for route in spec.moe.routes]
    parts["routers"] = n_moe * sum(_numel(router.parameters()) for router in routers)
    return parts


def _assert_counts_match(spec: ModelSpec) -> None:
    summary = summarize(spec)
    assert summary.vision.total == _vision_reference(spec.vision)
    assert summary.connector.total == _connector_reference(spec)
    language = {name: part.total for name, part in summary.language.parts.items()}
    assert language == _language_reference(spec) | _moe_reference(spec)
    assert summary.total_params == summary.vision.total + summary.connector.total + sum(language.values())


# ---------------------------------------------------------------- hand-made specs


def _tiny(language: dict, moe: dict | None, vision: dict | None = None) -> ModelSpec:
    vision = vision or {"type": "clip", "image_size": 28, "patch_size": 14, "hidden_size": 32, "num_layers": 2,
                        "num_heads": 2, "intermediate_size": 64}
    lang = {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "intermediate_size": 96, "vocab_size": 100} | language
    return ModelSpec.model_validate({"name": "tiny", "vision": vision, "connector": {"type": "linear"},
                                     "language": lang, "moe": moe})


def _moe(pool: dict | None = None, layers="every_other", top_k: int = 2) -> dict:
    pool = pool or {"num_experts": 4, "intermediate_size": 48}
    return {"layers": layers, "pools": {"experts": pool},
            "routes": [{"pool": "experts", "router": {"type": "topk", "top_k": top_k}}]}


SHARED_PLUS_ROUTED = {
    "layers": {"first_k_dense": 1},
    "pools": {"shared": {"num_experts": 2, "intermediate_size": 24}, "routed": {"num_experts": 8, "intermediate_size": 24}},
    "routes": [{"pool": "shared", "router": {"type": "dense"}}, {"pool": "routed", "router": {"type": "topk", "top_k": 3}}],
}
MLA = {"type": "mla", "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 24}

FAMILY_CASES = {
    "llama-gqa-tied-bias": _tiny({"type": "llama", "attention": {"type": "gqa"}, "num_kv_heads": 2, "head_dim": 24,
                                  "qkv_bias": True, "tie_word_embeddings": True}, _moe(layers=[1, 2])),
    "qwen2-gqa": _tiny({"type": "qwen2", "attention": {"type": "gqa"}, "num_kv_heads": 1}, _moe(layers="all")),
    "stablelm-qkv-bias": _tiny({"type": "stablelm", "qkv_bias": True}, _moe()),
    "stablelm-default": _tiny({"type": "stablelm"}, _moe(layers="second_half")),
    "phi-biased-experts": _tiny(
        {"type": "phi", "tie_word_embeddings": True},
        _moe({"num_experts": 4, "intermediate_size": 96, "gated": False, "bias": True, "activation": "gelu_new"})),
    "deepseek-mla": _tiny({"type": "deepseek_v2", "attention": MLA}, SHARED_PLUS_ROUTED),
    "deepseek-mla-q-lora-bias": _tiny({"type": "deepseek_v2", "attention": MLA | {"q_lora_rank": 40}, "qkv_bias": True},
                                      SHARED_PLUS_ROUTED),
    "deepseek-mha-head-dim": _tiny({"type": "deepseek_v2", "head_dim": 48}, SHARED_PLUS_ROUTED),
    "qwen3-gqa-qk-norm": _tiny({"type": "qwen3", "attention": {"type": "gqa"}, "num_kv_heads": 2, "head_dim": 24},
                               _moe(layers="all")),
    "deepseek_v3-mla": _tiny({"type": "deepseek_v3", "attention": MLA | {"q_lora_rank": 40}}, SHARED_PLUS_ROUTED),
    "llama-dense": _tiny({"type": "llama"}, None),
    "siglip-head": _tiny({"type": "llama"}, None, {"type": "siglip", "image_size": 28, "patch_size": 14,
                                                   "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                                   "intermediate_size": 64}),
}


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_family_counts_match_modules(case):
    _assert_counts_match(FAMILY_CASES[case])


def test_siglip_without_head_and_downsample_connector():
    spec = FAMILY_CASES["siglip-head"].model_copy(deep=True)
    spec.vision.use_head = False
    _assert_counts_match(spec)
    spec = load_spec("micro-deepseek-vl2", overrides=["+vision.use_head=false", "connector.factor=3"])
    _assert_counts_match(spec)
    spec = load_spec("micro-deepseek-vl2", overrides=["vision.tiling.global_view=false"])
    assert summarize(spec).connector.parts["tile_layout"].total == spec.language.hidden_size  # no separator
    _assert_counts_match(spec)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_counts_match_modules(preset):
    _assert_counts_match(load_spec(preset))


# ---------------------------------------------------------------- active parameters and FLOPs


def test_active_counts_the_modality_with_more_active_parameters():
    # Hard modality routing, H=64, 2 MoE layers, gated experts of 3*H*I parameters:
    # text: top-1 of txt (I=32: 6144 each) + its router 4*64; image: top-3 of img (I=16: 3072 each) + router 8*64.
    moe = {"layers": "all", "pools": {"txt": {"num_experts": 4, "intermediate_size": 32},
                                      "img": {"num_experts": 8, "intermediate_size": 16}},
           "routes": [{"tokens": "text", "pool": "txt", "router": {"type": "topk", "top_k": 1}},
                      {"tokens": "image", "pool": "img", "router": {"type": "topk", "top_k": 3}}]}
    summary = summarize(_tiny({"type": "llama", "num_layers": 2}, moe))
    parts = summary.language.parts
    assert summary.active_modality == "image"  # 2*3*3072 + 2*512 = 19456 > 2*6144 + 2*256 = 12800
    assert (parts["experts.img"].active, parts["experts.txt"].active) == (18432, 0)
    assert (parts["routers"].active, parts["routers"].total) == (1024, 1536)
    dense = sum(p.total for name, p in parts.items() if name not in ("experts.img", "experts.txt", "routers"))
    assert summary.language.active == dense + 19456
    assert summary.active_params == summary.vision.total + summary.connector.total + summary.language.active


def _two_routes(text_router: dict, image_router: dict) -> dict:
    """Text and image tokens over one pool of 4 experts of 3 * 64 * 48, in 2 MoE layers (every_other of 4)."""
    return _moe() | {"routes": [{"tokens": "text", "pool": "experts", "router": text_router},
                                {"tokens": "image", "pool": "experts", "router": image_router}]}


def test_two_routes_over_one_pool_count_the_larger_top_k_and_dense_counts_all():
    top2 = {"type": "topk", "top_k": 2}
    summary = summarize(_tiny({"type": "llama"}, _two_routes(top2, top2)))
    assert summary.language.parts["experts.experts"].active == 2 * 2 * 3 * 64 * 48  # 2 MoE layers, 2 experts
    assert summary.language.parts["routers"].active == 2 * 4 * 64  # one of the two routers per token
    # LTDR: an image tail token takes tail_top_k = 3 experts, so the image token is the most active
    ltdr = summarize(_tiny({"type": "llama"}, _two_routes(
        {"type": "deepspeed_top2"}, {"type": "dynamic_topk", "top_k": 2, "tail_top_k": 3})))
    assert ltdr.active_modality == "image"
    assert ltdr.language.parts["experts.experts"].active == 2 * 3 * 3 * 64 * 48
    assert ltdr.language_by_modality["text"].parts["experts.experts"].active == 2 * 2 * 3 * 64 * 48
    moe = SHARED_PLUS_ROUTED | {"routes": [*SHARED_PLUS_ROUTED["routes"],
                                           {"tokens": "image", "pool": "routed", "router": {"type": "dense"}}]}
    summary = summarize(_tiny({"type": "llama"}, moe))
    routed = summary.language.parts["experts.routed"]
    assert summary.active_modality == "image" and routed.active == routed.total


def test_flops_per_token_written_out():
    # llama, H=64, one layer, 4 heads of 16, I=96, V=100, no MoE, context 10.
    summary = summarize(_tiny({"type": "llama", "num_layers": 1}, None), context=10)
    attention = 2 * (4 * 64 * 64) + 2 * 10 * 4 * (16 + 16)  # q/k/v/o weights, then scores and values
    assert summary.flops_per_token == attention + 2 * 3 * 64 * 96 + 2 * 64 * 100
    assert summary.to_dict()["flops_per_token"] == summary.flops_per_token


def test_mla_flops_and_kv_cache_written_out():
    spec = FAMILY_CASES["deepseek-mla"]  # 4 layers, H=64, 4 heads, MLA above, 2 shared + top-3 of 8 (I=24)
    summary = summarize(spec, context=7)
    weights = 64 * 4 * 24 + 64 * (32 + 8) + 32 * 4 * (16 + 24) + 4 * 24 * 64
    per_layer = 2 * weights + 2 * 7 * 4 * (24 + 24)
    ffn = 2 * 3 * 64 * 96 + 3 * (2 * (2 + 3) * 3 * 64 * 24 + 2 * 8 * 64)  # 1 dense layer, 3 MoE layers
    assert summary.flops_per_token == 4 * per_layer + ffn + 2 * 64 * 100
    assert summary.kv_cache_bytes_per_token() == {d: 4 * (32 + 8) * b for d, b in BYTES_PER_DTYPE.items()}


@pytest.mark.parametrize("case", ["deepseek-mla", "llama-gqa-tied-bias", "stablelm-default"])
def test_kv_cache_matches_transformers_cache(case):
    spec = FAMILY_CASES[case]
    torch.manual_seed(0)
    model = _decoder(spec.language).eval()
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2, 3]]), use_cache=True)[CACHE_NAME]  # transformers names it by release
    per_token = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) // 3
    assert summarize(spec).kv_cache_elements_per_token == per_token


def test_gqa_kv_cache_and_memory_written_out():
    summary = summarize(FAMILY_CASES["llama-gqa-tied-bias"])  # 4 layers, 2 kv heads of 24
    assert summary.kv_cache_bytes_per_token()["bfloat16"] == 2 * 4 * 2 * 24 * 2
    assert summary.memory_bytes() == {d: summary.total_params * b for d, b in BYTES_PER_DTYPE.items()}


# ---------------------------------------------------------------- JSON, table, import


def test_json_keys_and_table():
    summary = summarize(load_spec("micro-moe-llava"))
    data = summary.to_dict()
    assert data["total_params"] == summary.total_params and data["active_params"] == summary.active_params
    language = data["components"]["language"]
    assert language["embedding"] == 512 * 128 and language["active"] == summary.language.active
    for name in ("vision", "connector", "language"):
        assert data["components"][name]["total"] == summary.components[name].total
    assert set(data) >= {"flops_per_token", "memory", "kv_cache_bytes_per_token", "counting", "context"}
    table = summary_table(summary).splitlines()
    assert table[0].split() == ["micro-moe-llava", "params", "active"]
    assert f"total {summary.total_params:,} {summary.active_params:,}" in [" ".join(line.split()) for line in table]
    assert f"language {summary.language.total:,} {summary.language.active:,}" in [" ".join(l.split()) for l in table]


def test_import_does_not_load_torch():
    code = ("import sys, moebuild.accounting, moebuild; moebuild.summarize; "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
