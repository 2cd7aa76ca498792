"""DeepSeek-VL2 checkpoints (github.com/deepseek-ai/DeepSeek-VL2, `deepseek_vl2/models/`) <-> moebuild
specs and state dicts (the interface is in `moebuild.convert`).

What the original config says, in spec terms (a field the config.json leaves out takes the
original class's default, as `DeepseekVLV2Config` / `VisionEncoderConfig` / `MlpProjectorConfig` /
`DeepseekV2Config` do; the released files rely on that, e.g. Small has no vocab_size):

| DeepSeek-VL2 | moebuild |
|---|---|
| vision_config (siglip_vit.VisionTransformer) | siglip; width, layers, heads; intermediate int(width * mlp_ratio); the last block + final norm (`select_layer: -1`, `post_norm`); `global_pool: map` = the attention-pooling head (`use_head`), built, never called (`ignore_head`) |
| candidate_resolutions, tile_tag 2D, global_view_pos head | tiling dynamic; tile_size = image_size; max_tiles = the largest grid, the list being every grid up to it in DeepSeek's order; max_images 2 (the processor's rule) |
| projector_config downsample_mlp_gelu / mlp_gelu / linear | connector downsample_mlp (factor = downsample_ratio) / mlp / linear; depth; mlp_ratio 1 only |
| language_config (modeling_deepseek.py) | deepseek_v2; `use_mla` = attention mla, else mha / gqa (transformers' LlamaAttention, as ATTENTION_CLASSES["mha_eager"]) |
| first_k_dense_replace, moe_layer_freq | moe.layers: layers i >= k with i % freq == 0 |
| n_shared_experts | pool `shared` of n_shared experts of moe_intermediate_size (their one MLP of n_shared * I), `dense` route |
| MoEGate: scoring_func, num_experts_per_tok, norm_topk_prob (only with k > 1), routed_scaling_factor | pool `routed`, `topk` route: score, top_k, normalize, scale |
| topk_method greedy / group_limited_greedy / noaux_tc | no groups / groups ranked by max / `bias: true` (e_score_correction_bias, loaded and fixed: noaux_tc cannot train there) with groups ranked by top2_sum; a dropped group's experts score 0.0 (`dropped_score: zero`, their masked_fill) |
| aux_loss_alpha, seq_aux | a seq_aux (seq_aux true) or load_balance term of coef alpha |

Balancing, where the two differ: with sigmoid scores moebuild's seq_aux normalises each token's
scores (DeepSeek-V3, eq. 19), MoEGate uses them raw (the loss value differs, not the forward).

Tensor names: `vision.*` is timm's ViT (fused `attn.qkv`, split into q/k/v here; `pos_embed`
[1, N, D] -> position_embedding [N, D]; the pooling head's `latent`, `q` + `kv` -> transformers'
`probe`, `in_proj_*`), `projector.layers.*`, `image_newline`, `view_seperator` (their spelling)
and `language.*`, which is moebuild's `language.*` except in MoE layers: `mlp.experts.E.{gate,up,
down}_proj.weight` stack into `pools.routed.{gate_up_proj [E, 2I, D], down_proj [E, D, I]}`,
`mlp.shared_experts.*` splits into the shared pool's experts (rows of gate/up, columns of down),
`mlp.gate.weight` / `.e_score_correction_bias` are the topk route's router.

The pooling head is carried as weights only: timm's `AttentionPoolLatent` uses exact GELU in its
MLP where transformers' SigLIP head uses the tanh approximation. Neither model calls it.
"""

from __future__ import annotations

import math
import re

import torch

from moebuild.model.pretrained import CheckpointError
from moebuild.model.processing import candidate_grids
from moebuild.schemas import ModelSpec

from .hf import rope_scaling_section, rope_scaling_v4
from .tensors import TensorSource, check_complete, expected_shapes, in_moe_layer, take_renamed

SHARED, ROUTED = "shared", "routed"  # pool names, as the zoo's deepseek-vl2 presets
# The original classes' defaults (modeling_deepseek_vl_v2.py, configuration_deepseek.py).
VISION_DEFAULTS = dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4,
                       global_pool="map", ignore_head=True, class_token=False)
PROJECTOR_DEFAULTS = dict(projector_type="downsample_mlp_gelu", input_dim=1152, n_embed=2048, depth=2, mlp_ratio=1,
                          downsample_ratio=2, token_pooling=False)
LANGUAGE_DEFAULTS = dict(
    vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407, num_hidden_layers=30,
    num_attention_heads=32, num_key_value_heads=32, n_shared_experts=None, n_routed_experts=None,
    routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
    qk_nope_head_dim=128, topk_method="gready", n_group=None, topk_group=None, num_experts_per_tok=None,
    moe_layer_freq=1, first_k_dense_replace=0, norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001,
    seq_aux=True, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, rope_scaling=None, attention_bias=False, use_mla=True,
)
TOP_DEFAULTS = dict(tile_tag="tile_tag", global_view_pos="head", candidate_resolutions=[[384, 384]])
_MLA_KEYS = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
_PROJECTORS = {"downsample_mlp_gelu": "downsample_mlp", "mlp_gelu": "mlp", "linear": "linear"}
FFN = ("gate_proj", "up_proj", "down_proj")


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(f"DeepSeek-VL2 config: {what}")


def _with_defaults(section, defaults: dict) -> dict:
    return {**defaults, **(section or {})}


# ------------------------------------------------------------------------------------ config -> spec


def spec_from_config(config: dict, *, name: str) -> dict:
    """The spec (plain dict) of a DeepSeek-VL2 config.json."""
    if config.get("model_type", "deepseek_vl_v2") != "deepseek_vl_v2":
        raise _refuse(f"model_type {config['model_type']!r} is not DeepSeek-VL2's (deepseek_vl_v2); "
                      "transformers' own MoE models import as `moebuild import hf`")
    top = _with_defaults(config, TOP_DEFAULTS)
    vision = _with_defaults(config.get("vision_config"), VISION_DEFAULTS)
    projector = _with_defaults(config.get("projector_config"), PROJECTOR_DEFAULTS)
    language = _with_defaults(config.get("language_config"), LANGUAGE_DEFAULTS)
    if top["tile_tag"] != "2D" or top["global_view_pos"] != "head":
        raise _refuse(f"tile_tag {top['tile_tag']!r}, global_view_pos {top['global_view_pos']!r}: moebuild lays "
                      "tiles out as tile_tag 2D with the global view at the head")
    moe = _moe_section(language)
    return {"moebuild_version": 1, "name": name, "description": "imported from a DeepSeek-VL2 config",
            "vision": _vision_section(vision, top), "connector": _connector_section(projector, vision, language),
            "language": _language_section(language), **({"moe": moe} if moe else {})}


def _max_tiles(resolutions, tile: int) -> int:
    grids = []
    for width, height in resolutions:
        if width % tile or height % tile:
            raise _refuse(f"candidate resolution {width}x{height} is not a grid of {tile}px tiles")
        grids.append((width // tile, height // tile))
    most = max(c * r for c, r in grids)
    if grids != candidate_grids(most):
        raise _refuse(f"candidate_resolutions {resolutions} are not every grid of up to {most} tiles in "
                      "DeepSeek-VL2's order (the only tiling moebuild's processor selects from)")
    return most


def _vision_section(vision: dict, top: dict) -> dict:
    if vision["class_token"] or not vision["ignore_head"]:
        raise _refuse("vision class_token / ignore_head false: DeepSeek-VL2 feeds the patch tokens on")
    if vision["global_pool"] not in ("map", ""):
        raise _refuse(f"vision global_pool {vision['global_pool']!r}: moebuild's SigLIP has the map head or none")
    tile = vision["image_size"]
    return {
        "type": "siglip", "image_size": tile, "patch_size": vision["patch_size"], "hidden_size": vision["width"],
        "num_layers": vision["layers"], "num_heads": vision["heads"],
        "intermediate_size": int(vision["width"] * vision["mlp_ratio"]),  # timm's Mlp width
        "select_layer": -1, "post_norm": True, "use_head": vision["global_pool"] == "map",
        "tiling": {"type": "dynamic", "tile_size": tile, "max_tiles": _max_tiles(top["candidate_resolutions"], tile),
                   "global_view": True, "max_images": 2},
    }


def _connector_section(projector: dict, vision: dict, language: dict) -> dict:
    kind = projector["projector_type"]
    if kind not in _PROJECTORS or projector["token_pooling"]:
        raise _refuse(f"projector_type {kind!r} (token_pooling {projector['token_pooling']}): moebuild has "
                      f"{', '.join(_PROJECTORS)}")
    if projector["mlp_ratio"] != 1 and kind == "downsample_mlp_gelu":
        raise _refuse(f"projector mlp_ratio {projector['mlp_ratio']}: moebuild's MLP layers all have the output width")
    if projector["input_dim"] != vision["width"] or projector["n_embed"] != language["hidden_size"]:
        raise _refuse(f"projector {projector['input_dim']} -> {projector['n_embed']} does not join vision width "
                      f"{vision['width']} to hidden_size {language['hidden_size']}")
    connector = {"type": _PROJECTORS[kind]}
    if kind != "linear":
        connector |= {"depth": projector["depth"], "activation": "gelu"}
    if kind == "downsample_mlp_gelu":
        connector["factor"] = projector["downsample_ratio"]
    return connector


def _language_section(language: dict) -> dict:
    heads = language["num_attention_heads"]
    kv_heads = language["num_key_value_heads"] or heads
    lang = {
        "type": "deepseek_v2", "hidden_size": language["hidden_size"], "num_layers": language["num_hidden_layers"],
        "num_heads": heads, "intermediate_size": language["intermediate_size"], "vocab_size": language["vocab_size"],
        "hidden_act": language["hidden_act"], "max_position_embeddings": language["max_position_embeddings"],
        "rope_theta": float(language["rope_theta"]), "norm_eps": float(language["rms_norm_eps"]),
        "rope_scaling": rope_scaling_section(language["rope_scaling"], "DeepSeek-VL2 config: language_config.rope_scaling"),
        "tie_word_embeddings": bool(language["tie_word_embeddings"]), "qkv_bias": bool(language["attention_bias"]),
    }
    if language["use_mla"]:
        lang["attention"] = {"type": "mla", **{key: language[key] for key in _MLA_KEYS}}
    elif kv_heads != heads:
        lang |= {"attention": {"type": "gqa"}, "num_kv_heads": kv_heads}
    else:
        lang["attention"] = {"type": "mha"}
    return lang


def _moe_layers(language: dict) -> list[int]:
    first, freq = language["first_k_dense_replace"], language["moe_layer_freq"]
    return [i for i in range(language["num_hidden_layers"]) if i >= first and i % freq == 0]


def _layer_pattern(language: dict, layers: list[int]):
    first = language["first_k_dense_replace"]
    if layers == list(range(first, language["num_hidden_layers"])):
        return "all" if first == 0 else {"first_k_dense": first}
    return layers


def _router(language: dict) -> dict:
    k, method = language["num_experts_per_tok"], language["topk_method"]
    router = {"type": "topk", "top_k": k, "score": language["scoring_func"],
              "normalize": bool(language["norm_topk_prob"]) and k > 1,  # MoEGate renormalises only for k > 1
              "scale": float(language["routed_scaling_factor"])}
    groups = language["n_group"] or 1
    if method == "noaux_tc":
        router["bias"] = True
    elif method not in ("greedy", "group_limited_greedy"):
        raise _refuse(f"topk_method {method!r}: MoEGate has greedy, group_limited_greedy and noaux_tc")
    if method != "greedy" and groups > 1:
        router["groups"] = {"num_groups": groups, "top_groups": language["topk_group"], "dropped_score": "zero",
                            "rank_by": "top2_sum" if method == "noaux_tc" else "max"}
    return router


def _moe_section(language: dict) -> dict | None:
    layers = _moe_layers(language)
    if not language["n_routed_experts"] or not layers:
        return None
    width, act = language["moe_intermediate_size"], language["hidden_act"]
    pools, routes = {}, []
    if language["n_shared_experts"]:
        pools[SHARED] = {"num_experts": language["n_shared_experts"], "intermediate_size": width, "activation": act}
        routes.append({"tokens": "all", "pool": SHARED, "router": {"type": "dense"}})
    pools[ROUTED] = {"num_experts": language["n_routed_experts"], "intermediate_size": width, "activation": act}
    routes.append({"tokens": "all", "pool": ROUTED, "router": _router(language)})
    balancing = []
    if language["aux_loss_alpha"]:
        kind = "seq_aux" if language["seq_aux"] else "load_balance"
        balancing.append({"type": kind, "coef": float(language["aux_loss_alpha"]), "tokens": "all"})
    return {"layers": _layer_pattern(language, layers), "pools": pools, "routes": routes, "balancing": balancing}


# ------------------------------------------------------------------------------------ spec -> config


def _route_indices(spec: ModelSpec) -> tuple[int, int | None]:
    """(index of the topk route, index of the dense shared route or None), or a refusal."""
    routes = spec.moe.routes
    kinds = [r.router.type for r in routes]
    topk = [i for i, kind in enumerate(kinds) if kind == "topk"]
    dense = [i for i, kind in enumerate(kinds) if kind == "dense"]
    if len(topk) != 1 or len(dense) > 1 or len(routes) != len(topk) + len(dense) \
            or len({r.pool for r in routes}) != len(routes) or any(r.tokens != "all" for r in routes):
        raise _refuse(f"{spec.name}: DeepSeek-VL2's MoE is one topk route and at most one dense (shared) route, "
                      f"each over its own pool, all tokens; this spec routes {kinds}")
    return topk[0], (dense[0] if dense else None)


def _check_spec(spec: ModelSpec) -> list[str]:
    """What DeepSeek-VL2's code would compute differently from this spec."""
    v, c, lang = spec.vision, spec.connector, spec.language
    problems = []
    if v is None or v.type != "siglip" or v.tiling is None:
        return [f"{spec.name}: DeepSeek-VL2 has a tiled SigLIP tower"]
    for what, bad in (
        ("select_layer must be -1 with post_norm", v.select_layer not in (-1, v.num_layers) or not v.post_norm),
        ("hidden_act gelu_pytorch_tanh, layer_norm_eps 1e-6", (v.hidden_act, v.layer_norm_eps) != ("gelu_pytorch_tanh", 1e-6)),
        ("tiling with a global view, max_images 2", not v.tiling.global_view or v.tiling.max_images != 2),
        (f"connector {c.type}", c.type not in _PROJECTORS.values() or getattr(c, "activation", "gelu") != "gelu"),
        ("language type deepseek_v2", lang.type != "deepseek_v2"),
        ("head_dim other than hidden_size / num_heads", lang.head_dim not in (None, lang.hidden_size // lang.num_heads)),
    ):
        if bad:
            problems.append(what)
    return problems


def _check_moe(spec: ModelSpec, topk: int, dense: int | None) -> list[str]:
    r = spec.moe.routes[topk].router
    problems = [f"router {key} {getattr(r, key)!r}" for key, value in dict(
        order="softmax_topk", capacity=None, curriculum=None, expert_dropout=0.0, dtype="float32").items()
        if getattr(r, key) != value]
    if r.noise is not None and r.noise.type != "none":
        problems.append(f"router noise {r.noise.type}")
    if r.normalize and r.top_k == 1:
        problems.append("normalize with top_k 1 (MoEGate renormalises only for k > 1)")
    if r.groups is not None and (r.groups.dropped_score != "zero"
                                 or r.groups.rank_by != ("top2_sum" if r.bias else "max")):
        problems.append(f"groups ranked by {r.groups.rank_by}, dropped_score {r.groups.dropped_score} (MoEGate: "
                        "max without a correction bias, top2_sum with one, dropped experts at 0.0)")
    act = spec.language.hidden_act or "silu"
    for name, pool in spec.moe.pools.items():
        if not pool.gated or pool.bias or pool.activation != act:
            problems.append(f"pool {name}: DeepSeek's experts are gated, bias-free, with the decoder's {act}")
    if dense is not None:
        shared, routed = spec.moe.pools[spec.moe.routes[dense].pool], spec.moe.pools[spec.moe.routes[topk].pool]
        if spec.moe.routes[dense].router.gate != "none" or shared.intermediate_size != routed.intermediate_size:
            problems.append("the shared experts are ungated and as wide as the routed ones")
    return problems


def _mlp_ratio(width: int, intermediate: int) -> float:
    """A ratio r with int(width * r) == intermediate (timm's Mlp width)."""
    ratio = intermediate / width
    while int(width * ratio) < intermediate:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def config_from_spec(spec: ModelSpec) -> dict:
    """The DeepSeek-VL2 config.json (plain dict) of a spec that maps onto DeepseekVLV2ForCausalLM."""
    problems = _check_spec(spec)
    topk = dense = None
    if not problems and spec.moe is not None:
        topk, dense = _route_indices(spec)
        problems += _check_moe(spec, topk, dense)
    if problems:
        raise _refuse(f"{spec.name} does not map onto DeepseekVLV2ForCausalLM: " + "; ".join(problems))
    v, c, lang = spec.vision, spec.connector, spec.language
    tile = v.tiling.tile_size
    vision = {"model_type": "vision", "image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size,
              "layers": v.num_layers, "heads": v.num_heads, "mlp_ratio": _mlp_ratio(v.hidden_size, v.intermediate_size),
              "global_pool": "map" if v.use_head else "", "ignore_head": True, "class_token": False}
    projector = {"model_type": "mlp_projector", "projector_type": {b: a for a, b in _PROJECTORS.items()}[c.type],
                 "input_dim": v.hidden_size, "n_embed": lang.hidden_size, "depth": getattr(c, "depth", 1),
                 "mlp_ratio": 1, "downsample_ratio": getattr(c, "factor", 1)}
    attention = lang.attention
    language = {
        "model_type": "deepseek_v2", "vocab_size": lang.vocab_size, "hidden_size": lang.hidden_size,
        "intermediate_size": lang.intermediate_size, "num_hidden_layers": lang.num_layers,
        "num_attention_heads": lang.num_heads, "num_key_value_heads": lang.num_kv_heads or lang.num_heads,
        "hidden_act": lang.hidden_act or "silu", "max_position_embeddings": lang.max_position_embeddings,
        "rms_norm_eps": lang.norm_eps, "rope_theta": lang.rope_theta, "rope_scaling": rope_scaling_v4(lang.rope_scaling),
        "attention_bias": bool(lang.qkv_bias), "tie_word_embeddings": lang.tie_word_embeddings,
        "use_mla": attention.type == "mla",
        **{key: getattr(attention, key, None) if attention.type == "mla" else (None if "lora" in key else 0)
           for key in _MLA_KEYS},
        **_moe_config(spec, topk, dense),
    }
    return {"model_type": "deepseek_vl_v2", "architectures": ["DeepseekVLV2ForCausalLM"], "tile_tag": "2D",
            "global_view_pos": "head",
            "candidate_resolutions": [[cols * tile, rows * tile] for cols, rows in candidate_grids(v.tiling.max_tiles)],
            "vision_config": vision, "projector_config": projector, "language_config": language}


def _moe_config(spec: ModelSpec, topk: int | None, dense: int | None) -> dict:
    if spec.moe is None:
        return {"n_routed_experts": None, "n_shared_experts": None, "aux_loss_alpha": 0.0}
    layers = spec.moe_layers()
    first = layers[0]
    steps = {b - a for a, b in zip(layers, layers[1:])}
    freq = steps.pop() if len(steps) == 1 else 1
    if layers != [i for i in range(spec.language.num_layers) if i >= first and i % freq == 0]:
        raise _refuse(f"{spec.name}: MoE layers {layers} are not 'every layer i >= k with i % freq == 0'")
    route = spec.moe.routes[topk]
    r, routed = route.router, spec.moe.pools[route.pool]
    method = "noaux_tc" if r.bias else ("group_limited_greedy" if r.groups else "greedy")
    balance = [t for t in spec.moe.balancing if t.type in ("seq_aux", "load_balance") and t.tokens == "all"]
    return {
        "n_routed_experts": routed.num_experts, "moe_intermediate_size": routed.intermediate_size,
        "n_shared_experts": spec.moe.pools[spec.moe.routes[dense].pool].num_experts if dense is not None else None,
        "first_k_dense_replace": first, "moe_layer_freq": freq, "num_experts_per_tok": r.top_k,
        "scoring_func": r.score, "norm_topk_prob": r.normalize, "routed_scaling_factor": r.scale,
        "topk_method": method, "n_group": r.groups.num_groups if r.groups else 1,
        "topk_group": r.groups.top_groups if r.groups else 1,
        "aux_loss_alpha": balance[0].coef if balance else 0.0,
        "seq_aux": balance[0].type == "seq_aux" if balance else True,
    }


def untranslated(spec: ModelSpec) -> list[str]:
    """Training-only parts of a spec that an exported DeepSeek-VL2 config does not carry."""
    if spec.moe is None:
        return []
    kept = next((t for t in spec.moe.balancing if t.type in ("seq_aux", "load_balance") and t.tokens == "all"), None)
    lost = [f"balancing term {t.type}" for t in spec.moe.balancing if t is not kept]
    biased = [r.router for r in spec.moe.routes if r.router.type == "topk" and not isinstance(r.router.bias, bool)]
    # noaux_tc cannot train in DeepSeek-VL2's code (MoEGate asserts eval): the bias is exported as loaded
    return lost + [f"correction-bias update_rate {r.bias.update_rate}" for r in biased]


# ------------------------------------------------------------------------------------ tensors

_V = r"vision\.vision_model\."
_PLAIN = [(re.compile(pattern), replacement) for pattern, replacement in (  # moebuild name -> original name
    (_V + r"embeddings\.patch_embedding\.", "vision.patch_embed.proj."),
    (_V + r"encoder\.layers\.(\d+)\.layer_norm1\.", r"vision.blocks.\1.norm1."),
    (_V + r"encoder\.layers\.(\d+)\.layer_norm2\.", r"vision.blocks.\1.norm2."),
    (_V + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"vision.blocks.\1.attn.proj."),
    (_V + r"encoder\.layers\.(\d+)\.mlp\.", r"vision.blocks.\1.mlp."),
    (_V + r"post_layernorm\.", "vision.norm."),
    (_V + r"head\.probe$", "vision.attn_pool.latent"),
    (_V + r"head\.attention\.out_proj\.", "vision.attn_pool.proj."),
    (_V + r"head\.layernorm\.", "vision.attn_pool.norm."),
    (_V + r"head\.mlp\.", "vision.attn_pool.mlp."),
    (r"connector\.image_newline$", "image_newline"),
    (r"connector\.view_separator$", "view_seperator"),  # sic
    (r"connector\.projector\.layers\.", "projector.layers."),
    (r"language\.", "language."),
)]
_POS = "vision.vision_model.embeddings.position_embedding.weight"
_QKV = re.compile(_V + r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$")
_IN_PROJ = re.compile(_V + r"head\.attention\.in_proj_(weight|bias)$")


def _special(key: str, moe_layers: set[int]) -> bool:
    """Tensors that are not a rename: reshaped, split or fused, or inside an MoE layer."""
    return key == _POS or bool(_QKV.match(key) or _IN_PROJ.match(key)) or in_moe_layer(key, moe_layers)


def _original_name(key: str, spec: ModelSpec) -> str:
    if spec.connector.type == "linear" and key.startswith("connector.projector.layers.0."):
        return "projector.layers." + key.removeprefix("connector.projector.layers.0.")  # a bare nn.Linear there
    for pattern, replacement in _PLAIN:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    raise CheckpointError(f"moebuild tensor {key} has no DeepSeek-VL2 name")


def _moe_names(spec: ModelSpec, layer: int) -> dict:
    topk, dense = _route_indices(spec)
    ours, theirs = f"language.model.layers.{layer}.mlp.", f"language.model.layers.{layer}.mlp."
    names = {"router": f"{ours}routes.{topk}.router.", "gate": theirs + "gate.",
             "routed": f"{ours}pools.{spec.moe.routes[topk].pool}.", "experts": theirs + "experts."}
    if dense is not None:
        names |= {"shared": f"{ours}pools.{spec.moe.routes[dense].pool}.", "shared_experts": theirs + "shared_experts."}
    return names


def _read_moe(source: TensorSource, spec: ModelSpec, layer: int, out: dict) -> None:
    names, (topk, dense) = _moe_names(spec, layer), _route_indices(spec)
    out[names["router"] + "weight"] = source.take(names["gate"] + "weight")
    if spec.moe.routes[topk].router.bias:
        out[names["router"] + "e_score_correction_bias"] = source.take(names["gate"] + "e_score_correction_bias")
    num_experts = spec.moe.pools[spec.moe.routes[topk].pool].num_experts
    gate, up, down = ([source.take(f"{names['experts']}{e}.{proj}.weight") for e in range(num_experts)] for proj in FFN)
    complete = all(t is not None for t in gate + up + down)
    out[names["routed"] + "gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(gate, up)]) if complete else None
    out[names["routed"] + "down_proj"] = torch.stack(down) if complete else None
    if dense is not None:  # one MLP of n_shared * I -> n_shared experts of I
        parts = spec.moe.pools[spec.moe.routes[dense].pool].num_experts
        gate, up, down = (source.take(f"{names['shared_experts']}{proj}.weight") for proj in FFN)
        complete = gate is not None and up is not None and down is not None
        out[names["shared"] + "gate_up_proj"] = torch.stack(
            [torch.cat(gu) for gu in zip(gate.chunk(parts), up.chunk(parts))]) if complete else None
        out[names["shared"] + "down_proj"] = torch.stack(down.chunk(parts, dim=1)) if complete else None


def _cat(*tensors, dim: int = 0):
    return None if any(t is None for t in tensors) else torch.cat(tensors, dim=dim)


def to_moebuild(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A DeepSeek-VL2 state dict -> moebuild's; every missing, left-over or mis-shaped tensor in one error."""
    if spec.moe is not None:
        _route_indices(spec)
    source = TensorSource(state, "the DeepSeek-VL2 checkpoint")
    moe_layers = set(spec.moe_layers())
    expected = expected_shapes(spec)
    out = take_renamed(source, spec, expected, lambda key: _original_name(key, spec), lambda key: _special(key, moe_layers))
    pos = source.take("vision.pos_embed")
    out[_POS] = None if pos is None else pos.reshape(-1, pos.shape[-1])  # [1, N, D] -> [N, D]
    ours = "vision.vision_model.encoder.layers.{}.self_attn.{}_proj.{}"
    for i in range(spec.vision.num_layers):
        for kind in ("weight", "bias"):
            qkv = source.take(f"vision.blocks.{i}.attn.qkv.{kind}")  # rows: q, then k, then v (timm's reshape)
            for name, part in zip("qkv", qkv.chunk(3) if qkv is not None else (None,) * 3):
                out[ours.format(i, name, kind)] = part
    if spec.vision.use_head:
        for kind in ("weight", "bias"):
            fused = _cat(source.take(f"vision.attn_pool.q.{kind}"), source.take(f"vision.attn_pool.kv.{kind}"))
            out[f"vision.vision_model.head.attention.in_proj_{kind}"] = fused  # q rows, then k, then v
    for layer in sorted(moe_layers):
        _read_moe(source, spec, layer, out)
    return check_complete(out, spec, source, expected)


def from_moebuild(state: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """moebuild's state dict -> (DeepSeek-VL2 config.json, its state dict)."""
    config = config_from_spec(spec)
    source = TensorSource(state, "the moebuild model")
    moe_layers = set(spec.moe_layers())
    out: dict[str, torch.Tensor] = {}
    for key in state:
        if not _special(key, moe_layers):
            out[_original_name(key, spec)] = source.take(key)
    out["vision.pos_embed"] = source.take(_POS)[None]
    ours = "vision.vision_model.encoder.layers.{}.self_attn.{}_proj.{}"
    for i in range(spec.vision.num_layers):
        for kind in ("weight", "bias"):
            out[f"vision.blocks.{i}.attn.qkv.{kind}"] = torch.cat([source.take(ours.format(i, n, kind)) for n in "qkv"])
    if spec.vision.use_head:
        width = spec.vision.hidden_size
        for kind in ("weight", "bias"):
            fused = source.take(f"vision.vision_model.head.attention.in_proj_{kind}")
            out[f"vision.attn_pool.q.{kind}"], out[f"vision.attn_pool.kv.{kind}"] = fused[:width], fused[width:]
    for layer in sorted(moe_layers):
        _write_moe(source, spec, layer, out)
    source.check_total(spec.name)
    return config, {key: value.contiguous() for key, value in out.items()}


def _write_moe(source: TensorSource, spec: ModelSpec, layer: int, out: dict) -> None:
    names, (topk, dense) = _moe_names(spec, layer), _route_indices(spec)
    out[names["gate"] + "weight"] = source.take(names["router"] + "weight")
    if spec.moe.routes[topk].router.bias:
        out[names["gate"] + "e_score_correction_bias"] = source.take(names["router"] + "e_score_correction_bias")
    gate_up, down = source.take(names["routed"] + "gate_up_proj"), source.take(names["routed"] + "down_proj")
    for e, (gu, d) in enumerate(zip(gate_up, down)):
        gate, up = gu.chunk(2)
        out |= {f"{names['experts']}{e}.gate_proj.weight": gate, f"{names['experts']}{e}.up_proj.weight": up,
                f"{names['experts']}{e}.down_proj.weight": d}
    if dense is not None:
        gate_up, down = source.take(names["shared"] + "gate_up_proj"), source.take(names["shared"] + "down_proj")
        gates, ups = zip(*(gu.chunk(2) for gu in gate_up))
        prefix = names["shared_experts"]
        out |= {prefix + "gate_proj.weight": torch.cat(gates), prefix + "up_proj.weight": torch.cat(ups),
                prefix + "down_proj.weight": torch.cat(list(down), dim=1)}
