"""MoE-LLaVA checkpoints (github.com/PKU-YuanGroup/MoE-LLaVA, `moellava/model/`) <-> moebuild specs
and state dicts (the interface is in `moebuild.convert`). LTDR checkpoints are MoE-LLaVA's
with a different routing rule for image tokens: format `ltdr` is this module under LTDR's name
(`moebuild.convert.ltdr` passes `system="LTDR"`, which only the error messages and the description read).

What the original config says, in spec terms:

| MoE-LLaVA | moebuild |
|---|---|
| model_type moe_llava_stablelm / moe_llava_phi / moe_llava_llama / moe_llava_qwen | language stablelm (rope_pct -> partial_rotary_factor, use_qkv_bias) / phi (no LM-head bias: their `nn.Linear(bias=False)`) / llama / qwen2 (Qwen v1: SwiGLU of intermediate_size // 2, rotary_emb_base; its logn attention and dynamic NTK act only past seq_length and are exported off) |
| mm_image_tower + its CLIP config (`image_tower_config.json` beside config.json, or a known hub name) | clip; select_layer = mm_vision_select_layer, select_feature = mm_vision_select_feature |
| image_projector_type linear / mlpNx_gelu | connector linear / mlp of depth N, gelu |
| moe.moe_layers_idx, num_experts, top_k_experts 2 | moe.layers (every_other when it is 0, 2, ...); one pool `experts`, the decoder's FFN shape (Phi: fc1/fc2 with biases, not gated) |
| DeepSpeed TopKGate (top2gating), capacity_factor, eval_capacity_factor, min_capacity | one `deepspeed_top2` route over all tokens, not causal, capacity {train, eval, min} |
| router_aux_loss_coef | a `switch_aux` term of that coef (DeepSpeed's l_aux, summed over layers into the loss) |

Refused, with the reason: use_residual (residual MoE), top_k_experts other than 2 (top1gating),
different expert counts per layer, the Qwen1.5 / MiniCPM / MPT backbones,
projector types other than linear / mlpNx_gelu.

Tensor names: `model.image_tower.image_tower.*` -> `vision.*`, `model.mm_projector.image_spatial_proj.*`
-> `connector.layers.*` (the bare nn.Linear of `linear`: `image_spatial_proj.weight`), `model.*` ->
`language.model.*`, `lm_head.*` -> `language.lm_head.*`, except in MoE layers:
`mlp.deepspeed_moe.gate.wg.weight` is every route's router (LTDR routes text and image tokens
through MoE-LLaVA's one gate, so an LTDR spec's routers are equal copies of it), and
`mlp.deepspeed_moe.experts.deepspeed_experts.E.{gate,up,down}_proj.weight` (Phi: `fc1`, `fc2`
with biases) stack into `pools.experts.{gate_up_proj [E, 2I, D], down_proj [E, D, I]}` (Phi:
`up_proj`, `down_proj` and their biases). Qwen v1 is renamed to that naming first: `transformer.*`,
the fused `attn.c_attn` split into q/k/v, `mlp.w1` = up, `w2` = gate, `c_proj` = down (its golden
file is still to make: the Qwen backbone is checked by names and round trip only).
"""

from __future__ import annotations

import re

import torch

from moebuild.model.pretrained import CheckpointError
from moebuild.schemas import ModelSpec

from .hf import rope_scaling_section, rope_scaling_v4, tokens_section
from .tensors import TensorSource, check_complete, expected_shapes, in_moe_layer, take_renamed

POOL = "experts"
# Files a MoE-LLaVA checkpoint directory may hold beside config.json: the CLIP tower's config,
# which config.json names only by hub id (checkpoints.read_config puts it under this key).
COMPANIONS = {"image_tower_config.json": "image_tower_config"}
KNOWN_TOWERS = {  # hub id -> CLIPVisionConfig fields, for checkpoints that ship no tower config
    "openai/clip-vit-large-patch14-336": dict(image_size=336, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                                              num_attention_heads=16, intermediate_size=4096),
    "openai/clip-vit-large-patch14": dict(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                                          num_attention_heads=16, intermediate_size=4096),
}
TOWER_DEFAULTS = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
FAMILIES = {"moe_llava_stablelm": "stablelm", "moe_llava_phi": "phi", "moe_llava_llama": "llama",
            "moe_llava_qwen": "qwen2"}
ARCHITECTURES = {"stablelm": "MoELLaVAStablelmForCausalLM", "phi": "MoELLaVAPhiForCausalLM",
                 "llama": "MoELLaVALlamaForCausalLM", "qwen2": "MoELLaVAQWenForCausalLM"}
_GATED = ("gate_proj", "up_proj", "down_proj")
SYSTEM = "MoE-LLaVA"


# ------------------------------------------------------------------------------------ config -> spec


def spec_from_config(config: dict, *, name: str, system: str = SYSTEM) -> dict:
    """The spec (plain dict) of a MoE-LLaVA config.json; a refusal starts `{system} config:`."""
    try:
        family = FAMILIES.get(config.get("model_type"))
        if family is None:
            raise CheckpointError(f"model_type {config.get('model_type')!r}: moebuild reads {', '.join(FAMILIES)} "
                                  "(the Qwen1.5, MiniCPM and MPT backbones are not mapped yet)")
        spec = {"moebuild_version": 1, "name": name, "description": f"imported from a {system} config",
                "vision": _vision_section(config), "connector": _connector_section(config),
                "language": _language_section(config, family), "tokens": tokens_section(config)}
        moe = _moe_section(config, family)
    except CheckpointError as exc:
        raise CheckpointError(f"{system} config: {exc}") from None
    return spec | ({"moe": moe} if moe else {})


def _tower(config: dict) -> dict:
    tower = config.get("image_tower_config") or KNOWN_TOWERS.get(config.get("mm_image_tower"))
    if tower is None:
        raise CheckpointError(f"image tower {config.get('mm_image_tower')!r} is not one moebuild knows "
                              f"({', '.join(KNOWN_TOWERS)}); put its CLIP config.json beside config.json as "
                              "image_tower_config.json")
    return TOWER_DEFAULTS | tower


def _vision_section(config: dict) -> dict:
    tower = _tower(config)
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"mm_vision_select_feature {feature!r}: CLIP features are patch or cls_patch")
    if config.get("mm_hidden_size", tower["hidden_size"]) != tower["hidden_size"]:
        raise CheckpointError(f"mm_hidden_size {config['mm_hidden_size']} is not the tower's width "
                              f"{tower['hidden_size']}")
    return {"type": "clip", "image_size": tower["image_size"], "patch_size": tower["patch_size"],
            "hidden_size": tower["hidden_size"], "num_layers": tower["num_hidden_layers"],
            "num_heads": tower["num_attention_heads"], "intermediate_size": tower["intermediate_size"],
            "hidden_act": tower["hidden_act"], "layer_norm_eps": float(tower["layer_norm_eps"]),
            "select_layer": config.get("mm_vision_select_layer", -2), "select_feature": feature}


def _connector_section(config: dict) -> dict:
    kind = config.get("image_projector_type", "linear")
    if kind == "linear":
        return {"type": "linear"}
    depth = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if depth is None:
        raise CheckpointError(f"image_projector_type {kind!r}: moebuild has linear and mlpNx_gelu")
    return {"type": "mlp", "depth": int(depth.group(1)), "activation": "gelu"}


def _language_section(config: dict, family: str) -> dict:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    lang = {"type": family, "hidden_size": config["hidden_size"], "num_layers": config["num_hidden_layers"],
            "num_heads": heads, "intermediate_size": config["intermediate_size"], "vocab_size": config["vocab_size"],
            "hidden_act": config["hidden_act"], "max_position_embeddings": config["max_position_embeddings"],
            "rope_theta": float(config.get("rope_theta", 10000.0)),
            "rope_scaling": rope_scaling_section(config.get("rope_scaling"), "rope_scaling"),
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}
    if kv_heads != heads:
        lang |= {"attention": {"type": "gqa"}, "num_kv_heads": kv_heads}
    if family == "stablelm":
        if config.get("qk_layernorm") or config.get("use_parallel_residual"):
            raise CheckpointError("StableLM qk_layernorm / use_parallel_residual: moebuild's stablelm has neither")
        lang |= {"partial_rotary_factor": float(config.get("rope_pct", 0.25)),
                 "qkv_bias": bool(config.get("use_qkv_bias", False)), "norm_eps": float(config["norm_eps"])}
    elif family == "phi":
        if config.get("qk_layernorm"):
            raise CheckpointError("Phi qk_layernorm: moebuild's phi has none")
        lang |= {"partial_rotary_factor": float(config.get("partial_rotary_factor", 0.5)),
                 "norm_eps": float(config["layer_norm_eps"]), "lm_head_bias": False}
    elif family == "qwen2":  # Qwen v1: its SwiGLU is intermediate_size // 2 wide, q/k/v biased, no o bias
        if config.get("kv_channels", 128) * heads != config["hidden_size"] or config.get("rotary_pct", 1.0) != 1.0 \
                or not config.get("no_bias", True):
            raise CheckpointError("Qwen kv_channels * heads != hidden_size, rotary_pct < 1 or biased MLPs: "
                                  "not moebuild's qwen2")
        lang |= {"intermediate_size": config["intermediate_size"] // 2, "hidden_act": "silu",
                 "rope_theta": float(config.get("rotary_emb_base", 10000.0)),
                 "norm_eps": float(config.get("layer_norm_epsilon", 1e-6))}
    else:
        lang |= {"qkv_bias": bool(config.get("attention_bias", False)), "norm_eps": float(config["rms_norm_eps"])}
    return lang


def _layers(indices: list[int], num_layers: int):
    return "every_other" if indices == list(range(0, num_layers, 2)) else indices


def _moe_section(config: dict, family: str) -> dict | None:
    moe = config.get("moe") or {}
    if not moe.get("moe_enable", bool(moe)) or not moe.get("moe_layers_idx"):
        return None
    if moe.get("use_residual"):
        raise CheckpointError("moe.use_residual (residual MoE: a dense FFN beside the experts, mixed by a learned "
                              "coefficient) is not a moebuild route yet")
    if moe.get("top_k_experts", 2) != 2:
        raise CheckpointError(f"moe.top_k_experts {moe['top_k_experts']}: moebuild has DeepSpeed's top2gating only")
    counts = set(moe["num_experts"]) if isinstance(moe["num_experts"], list) else {moe["num_experts"]}
    if len(counts) != 1:
        raise CheckpointError(f"moe.num_experts {moe['num_experts']}: moebuild's MoE layers share one pool shape")
    width = config["intermediate_size"] // 2 if family == "qwen2" else config["intermediate_size"]
    pool = {"num_experts": counts.pop(), "intermediate_size": width, "activation": config.get("hidden_act", "silu")}
    if family == "phi":
        pool |= {"gated": False, "bias": True}
    capacity = {"train": float(moe.get("capacity_factor", 1.0)), "eval": float(moe.get("eval_capacity_factor", 1.0)),
                "min": int(moe.get("min_capacity", 4))}
    route = {"tokens": "all", "causal": False, "pool": POOL, "router": {"type": "deepspeed_top2", "capacity": capacity}}
    coef = float(moe.get("router_aux_loss_coef", 0.01))
    return {"layers": _layers(sorted(moe["moe_layers_idx"]), config["num_hidden_layers"]),
            "pools": {POOL: pool}, "routes": [route],
            "balancing": [{"type": "switch_aux", "coef": coef, "tokens": "all"}] if coef else []}


# ------------------------------------------------------------------------------------ spec -> config


def _family_problems(spec: ModelSpec) -> list[str]:
    v, c, lang = spec.vision, spec.connector, spec.language
    if v is None or v.type != "clip" or v.tiling is not None or v.post_norm:
        return [f"{spec.name}: MoE-LLaVA has an untiled CLIP tower"]
    problems = []
    if lang.type not in ARCHITECTURES:
        problems.append(f"language {lang.type} (MoE-LLaVA's backbones here: {', '.join(ARCHITECTURES)})")
    if c.type not in ("linear", "mlp") or getattr(c, "activation", "gelu") != "gelu":
        problems.append(f"connector {c.type}")
    if lang.type == "phi" and lang.lm_head_bias is not False:
        problems.append("phi with an LM-head bias (MoE-LLaVA's Phi head has none: lm_head_bias: false)")
    if lang.attention.type == "mla" or lang.head_dim not in (None, lang.hidden_size // lang.num_heads):
        problems.append("attention other than MHA / GQA of head_dim hidden_size / num_heads")
    return problems


def _moe_problems(spec: ModelSpec) -> list[str]:
    """What MoE-LLaVA's one DeepSpeed gate per MoE layer cannot express (LTDR's image route aside)."""
    moe = spec.moe
    if len(moe.pools) != 1:
        return [f"pools {list(moe.pools)} (MoE-LLaVA has one)"]
    first = moe.routes[0].router
    if first.type != "deepspeed_top2" or moe.routes[0].tokens not in ("all", "text"):
        return [f"first route {first.type} over {moe.routes[0].tokens} tokens (MoE-LLaVA: deepspeed_top2)"]
    problems = []
    if first.capacity is None or first.capacity.train is None:
        problems.append("a dropless deepspeed_top2 (MoE-LLaVA always has a training capacity factor)")
    if not first.eval_noise or first.dtype != "float32":
        problems.append("deepspeed_top2 without evaluation noise or in low precision")
    (pool,) = moe.pools.values()
    act = spec.language.hidden_act or ("gelu_new" if spec.language.type == "phi" else "silu")
    ffn = (False, True) if spec.language.type == "phi" else (True, False)
    if (pool.gated, pool.bias) != ffn or pool.activation != act or pool.intermediate_size != spec.language.intermediate_size:
        problems.append(f"pool {POOL}: MoE-LLaVA's experts are copies of the decoder's FFN")
    return problems


def config_from_spec(spec: ModelSpec, system: str = SYSTEM) -> dict:
    """The MoE-LLaVA config.json (plain dict) of a spec that maps onto MoE-LLaVA's model."""
    problems = _family_problems(spec)
    if not problems and spec.moe is not None:
        problems = _moe_problems(spec)
    if problems:
        raise CheckpointError(f"{spec.name} does not map onto {system}'s model: " + "; ".join(problems))
    v, c, lang = spec.vision, spec.connector, spec.language
    config = {
        "architectures": [ARCHITECTURES[lang.type]],
        "model_type": {family: model_type for model_type, family in FAMILIES.items()}[lang.type],
        "vocab_size": lang.vocab_size, "hidden_size": lang.hidden_size, "intermediate_size": lang.intermediate_size,
        "num_hidden_layers": lang.num_layers, "num_attention_heads": lang.num_heads,
        "num_key_value_heads": lang.num_kv_heads or lang.num_heads,
        "hidden_act": lang.hidden_act or ("gelu_new" if lang.type == "phi" else "silu"),
        "max_position_embeddings": lang.max_position_embeddings, "rope_theta": lang.rope_theta,
        "rope_scaling": rope_scaling_v4(lang.rope_scaling), "tie_word_embeddings": lang.tie_word_embeddings,
        "bos_token_id": spec.tokens.bos, "eos_token_id": spec.tokens.eos,
        **_family_config(spec),
        "mm_image_tower": "moebuild/clip", "mm_hidden_size": v.hidden_size,
        "mm_vision_select_layer": v.select_layer, "mm_vision_select_feature": v.select_feature,
        "image_projector_type": "linear" if c.type == "linear" else f"mlp{c.depth}x_gelu",
        "image_tower_config": {"model_type": "clip_vision_model", "image_size": v.image_size,
                               "patch_size": v.patch_size, "hidden_size": v.hidden_size,
                               "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                               "intermediate_size": v.intermediate_size, "hidden_act": v.hidden_act,
                               "layer_norm_eps": v.layer_norm_eps},
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
    }
    if spec.moe is not None:
        config["moe"] = _moe_config(spec)
    return config


def _family_config(spec: ModelSpec) -> dict:
    lang = spec.language
    if lang.type == "stablelm":
        return {"rope_pct": lang.partial_rotary_factor or 0.25, "use_qkv_bias": bool(lang.qkv_bias),
                "norm_eps": lang.norm_eps}
    if lang.type == "phi":
        return {"partial_rotary_factor": lang.partial_rotary_factor or 0.4, "layer_norm_eps": lang.norm_eps,
                "qk_layernorm": False}
    if lang.type == "qwen2":  # logn attention and dynamic NTK off: moebuild computes neither
        return {"intermediate_size": 2 * lang.intermediate_size, "kv_channels": lang.hidden_size // lang.num_heads,
                "rotary_pct": 1.0, "rotary_emb_base": lang.rope_theta, "layer_norm_epsilon": lang.norm_eps,
                "no_bias": True, "seq_length": lang.max_position_embeddings, "use_logn_attn": False,
                "use_dynamic_ntk": False}
    return {"attention_bias": bool(lang.qkv_bias), "rms_norm_eps": lang.norm_eps}


def _moe_config(spec: ModelSpec) -> dict:
    (pool,) = spec.moe.pools.values()
    capacity = spec.moe.routes[0].router.capacity
    aux = [t for t in spec.moe.balancing if t.type == "switch_aux"]
    layers = spec.moe_layers()
    return {"moe_enable": True, "moe_mode": "custom", "moe_layers_idx": layers,
            "num_experts": [pool.num_experts] * len(layers), "top_k_experts": 2, "ep_size": 1,
            "capacity_factor": capacity.train, "eval_capacity_factor": capacity.eval or capacity.train,
            "min_capacity": capacity.min, "use_residual": False, "router_aux_loss_coef": aux[0].coef if aux else 0.0,
            "train_modules": []}


def untranslated(spec: ModelSpec) -> list[str]:
    """Parts of a spec an exported MoE-LLaVA config does not carry (LTDR's image route among them)."""
    if spec.moe is None:
        return []
    aux = next((t for t in spec.moe.balancing if t.type == "switch_aux"), None)
    lost = [f"balancing term {t.type} over {t.tokens} tokens" for t in spec.moe.balancing if t is not aux]
    routes = [f"route {i} ({r.router.type} over {r.tokens} tokens)" for i, r in enumerate(spec.moe.routes) if i]
    return routes + lost


# ------------------------------------------------------------------------------------ tensors


def _original_name(key: str, spec: ModelSpec) -> str:
    if key.startswith("vision."):
        return "model.image_tower.image_tower." + key.removeprefix("vision.")
    if key.startswith("connector.layers."):
        rest = key.removeprefix("connector.layers.")
        return "model.mm_projector.image_spatial_proj." + (rest.removeprefix("0.") if spec.connector.type == "linear" else rest)
    if key.startswith("language."):
        return key.removeprefix("language.")
    raise CheckpointError(f"moebuild tensor {key} has no MoE-LLaVA name")


def _expert_names(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """moebuild pool tensor -> the original per-expert tensors it stacks (concatenated along dim 0)."""
    if spec.language.type == "phi":
        return {"up_proj": ("fc1.weight",), "up_proj_bias": ("fc1.bias",), "down_proj": ("fc2.weight",),
                "down_proj_bias": ("fc2.bias",)}
    return {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",)}


def _stack(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(p is None for p in parts) else torch.stack(parts)


# Qwen v1 (`transformer.*`, fused c_attn, w1 = up, w2 = gate, c_proj = down) <-> the naming of
# MoE-LLaVA's other backbones, which the rest of this module reads.
_QWEN_NAMES = [  # (Qwen v1, the other backbones); {L} a layer, {X} an expert's prefix inside an MoE layer
    ("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
    ("transformer.h.{L}.ln_1.", "model.layers.{L}.input_layernorm."),
    ("transformer.h.{L}.ln_2.", "model.layers.{L}.post_attention_layernorm."),
    ("transformer.h.{L}.attn.c_proj.", "model.layers.{L}.self_attn.o_proj."),
    ("transformer.h.{L}.mlp.{X}w1.", "model.layers.{L}.mlp.{X}up_proj."),
    ("transformer.h.{L}.mlp.{X}w2.", "model.layers.{L}.mlp.{X}gate_proj."),
    ("transformer.h.{L}.mlp.{X}c_proj.", "model.layers.{L}.mlp.{X}down_proj."),
    ("transformer.h.{L}.mlp.deepspeed_moe.gate.", "model.layers.{L}.mlp.deepspeed_moe.gate."),
    ("transformer.image_tower.", "model.image_tower."), ("transformer.mm_projector.", "model.mm_projector."),
]


def _rule(source: str, target: str) -> tuple[re.Pattern, str]:
    pattern = "^" + re.escape(source).replace(r"\{L\}", r"(?P<L>\d+)").replace(
        r"\{X\}", r"(?P<X>(?:deepspeed_moe\.experts\.deepspeed_experts\.\d+\.)?)")
    return re.compile(pattern), target.replace("{L}", r"\g<L>").replace("{X}", r"\g<X>")


_QWEN = [_rule(theirs, ours) for theirs, ours in _QWEN_NAMES]
_QWEN_BACK = [_rule(ours, theirs) for theirs, ours in _QWEN_NAMES]
_C_ATTN = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$")
_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _renamed(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key


def _from_qwen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if match := _C_ATTN.match(key):  # rows: q, then k, then v (QWenAttention's split)
            for name, part in zip("qkv", value.chunk(3)):
                out[f"model.layers.{match[1]}.self_attn.{name}_proj.{match[2]}"] = part
            continue
        out[_renamed(key, _QWEN)] = value
    return out


def _to_qwen(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, qkv = {}, {}
    for key, value in state.items():
        if match := _QKV.match(key):
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        out[_renamed(key, _QWEN_BACK)] = value
    for (layer, kind), parts in qkv.items():
        out[f"transformer.h.{layer}.attn.c_attn.{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out


def to_moebuild(state: dict[str, torch.Tensor], spec: ModelSpec, system: str = SYSTEM) -> dict[str, torch.Tensor]:
    """A MoE-LLaVA state dict -> moebuild's; every missing, left-over or mis-shaped tensor in one error
    (for a Qwen backbone, named as the other backbones name them: c_attn as q/k/v_proj, w1 as up_proj)."""
    if spec.language.type == "qwen2":
        state = _from_qwen(state)
    if spec.moe is not None and (problems := _moe_problems(spec)):
        raise CheckpointError(f"{spec.name} does not map onto {system}'s model: " + "; ".join(problems))
    source = TensorSource(state, f"the {system} checkpoint")
    moe_layers = set(spec.moe_layers())
    expected = expected_shapes(spec)
    out = take_renamed(source, spec, expected, lambda key: _original_name(key, spec), lambda key: in_moe_layer(key, moe_layers))
    for layer in sorted(moe_layers):
        theirs, ours = f"model.layers.{layer}.mlp.deepspeed_moe.", f"language.model.layers.{layer}.mlp."
        gate = source.take(theirs + "gate.wg.weight")
        for i in range(len(spec.moe.routes)):  # LTDR: the one gate routes text and image tokens
            out[f"{ours}routes.{i}.router.weight"] = gate
        (pool,) = spec.moe.pools.values()
        for name, originals in _expert_names(spec).items():
            per_expert = [[source.take(f"{theirs}experts.deepspeed_experts.{e}.{o}") for o in originals]
                          for e in range(pool.num_experts)]
            out[f"{ours}pools.{POOL}.{name}"] = _stack([None if None in p else torch.cat(p) for p in per_expert])
    return check_complete(out, spec, source, expected)


def from_moebuild(state: dict[str, torch.Tensor], spec: ModelSpec,
                  system: str = SYSTEM) -> tuple[dict, dict[str, torch.Tensor]]:
    """moebuild's state dict -> (MoE-LLaVA config.json, its state dict)."""
    config = config_from_spec(spec, system)
    source = TensorSource(state, "the moebuild model")
    moe_layers = set(spec.moe_layers())
    out = {_original_name(key, spec): source.take(key) for key in state if not in_moe_layer(key, moe_layers)}
    for layer in sorted(moe_layers):
        theirs, ours = f"model.layers.{layer}.mlp.deepspeed_moe.", f"language.model.layers.{layer}.mlp."
        gates = [source.take(f"{ours}routes.{i}.router.weight") for i in range(len(spec.moe.routes))]
        if any(not torch.equal(g, gates[0]) for g in gates[1:]):
            raise CheckpointError(f"layer {layer}: the routes' routers differ; MoE-LLaVA's checkpoint has one gate "
                                  "per MoE layer (an LTDR model exports when its routes share it)")
        out[theirs + "gate.wg.weight"] = gates[0]
        for name, originals in _expert_names(spec).items():
            for e, stacked in enumerate(source.take(f"{ours}pools.{POOL}.{name}")):
                for original, part in zip(originals, stacked.chunk(len(originals))):
                    out[f"{theirs}experts.deepspeed_experts.{e}.{original}"] = part
    source.check_total(spec.name)
    if spec.language.type == "qwen2":
        out = _to_qwen(out)
    return config, {key: value.contiguous() for key, value in out.items()}
