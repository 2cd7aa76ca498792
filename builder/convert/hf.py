"""transformers' MoE language models <-> text-only moebuild specs: Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V2 and DeepSeek-V3 (the interface is in `moebuild.convert`).

What each config says, in spec terms:

| transformers | moebuild |
|---|---|
| Mixtral | llama family; every layer MoE; `topk` softmax, `normalize: true`; `router_jitter_noise` -> jitter noise |
| Qwen2-MoE | qwen2 family (llama when `qkv_bias: false`); MoE layers from `decoder_sparse_step` and `mlp_only_layers`; `topk` softmax, `normalize: norm_topk_prob`; the shared expert a one-expert pool behind a `dense` route with `gate: sigmoid` |
| Qwen3-MoE | qwen3 family (q/k norms); as Qwen2-MoE without the shared expert |
| DeepSeek-V2 | deepseek_v2 family, MLA; `first_k_dense_replace`; `topk` softmax, `scale: routed_scaling_factor`, `group_limited_greedy` -> groups ranked by `max`; `n_shared_experts` experts of `moe_intermediate_size` behind a `dense` route |
| DeepSeek-V3 | deepseek_v3 family, MLA; `topk` sigmoid with `bias: true` (e_score_correction_bias), groups ranked by `top2_sum` with `dropped_score: -inf` (transformers' router), `normalize: norm_topk_prob`, `scale: routed_scaling_factor` |

Balancing: transformers' load-balancing loss pools every MoE layer's tokens into one
E * sum_{k,e} f_{k,e} P_e, which is K at balance, times `router_aux_loss_coef`; moebuild sums a
per-layer `load_balance` term that is 1 at balance. `coef = router_aux_loss_coef * K / L` (L MoE
layers) gives the same loss at balance and the same gradient scale; away from balance the pooled
and per-layer forms differ by cross-layer terms (moebuild balances each layer, as DeepSeek and
Switch do). transformers' DeepSeek models have no aux loss: none is imported.

Tensor names: transformers 5 keeps the experts fused in memory (`mlp.experts.gate_up_proj`
[E, 2I, D], gate rows first, and `mlp.experts.down_proj` [E, D, I]: moebuild's layout) but writes
them per expert on disk (`mlp.experts.E.{gate,up,down}_proj.weight`; Mixtral
`block_sparse_moe.experts.E.{w1,w3,w2}.weight`, router `block_sparse_moe.gate.weight`).
`to_moebuild` reads either; `from_moebuild` writes the on-disk naming. DeepSeek's shared experts
are one MLP of width n_shared * I: its gate/up rows and down columns split into n_shared experts.

Rope scaling (linear, dynamic, yarn, llama3) is `language.rope_scaling`. Refused, with the
reason: other rope types, sliding-window attention, DeepSeek-V3 without interleaved rope, and on export every router or layout that
transformers' model would compute differently (capacity, noise other than Mixtral's jitter,
curricula, ...). Training-only parts of a spec that have no config field are listed by
`untranslated` so the CLI can say what the exported config does not carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebuild.model.pretrained import CheckpointError
from moebuild.schemas import ModelSpec

from .tensors import TensorSource, check_complete

FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    """Where one transformers MoE architecture keeps its MoE block's tensors on disk."""

    architecture: str
    moe_key: str
    expert_names: tuple[str, str, str]  # gate, up, down
    shared_key: str | None = None
    shared_gate_key: str | None = None
    mla: bool = False


LAYOUTS = {
    "mixtral": Layout("MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": Layout("Qwen2MoeForCausalLM", "mlp", FFN, "shared_expert", "shared_expert_gate"),
    "qwen3_moe": Layout("Qwen3MoeForCausalLM", "mlp", FFN),
    "deepseek_v2": Layout("DeepseekV2ForCausalLM", "mlp", FFN, "shared_experts", mla=True),
    "deepseek_v3": Layout("DeepseekV3ForCausalLM", "mlp", FFN, "shared_experts", mla=True),
}
ROUTED, SHARED = "experts", "shared"  # pool names of imported specs
_MLA_KEYS = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def _refuse(what: str) -> CheckpointError:
    return CheckpointError(what)


# ------------------------------------------------------------------------------------ config -> spec


def spec_from_config(config: dict, *, name: str) -> dict:
    """The text-only spec (plain dict) of a transformers MoE config.json."""
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        raise _refuse(f"model_type {model_type!r} is not one moebuild imports ({', '.join(LAYOUTS)})")
    _refuse_unsayable(config, model_type)
    moe = _moe_section(config, model_type)
    return {"moebuild_version": 1, "name": name, "description": f"imported from a transformers {model_type} config",
            "language": _language_section(config, model_type), **({"moe": moe} if moe else {}),
            **({"tokens": tokens} if (tokens := tokens_section(config)) else {})}


def tokens_section(config: dict) -> dict:
    """The spec's `tokens` of the special ids a transformers config names: bos and eos where the
    config has the key (null stays null), pad only where it is set."""
    tokens = {key: config[f"{key}_token_id"] for key in ("bos", "eos") if f"{key}_token_id" in config}
    if isinstance(tokens.get("eos"), list):
        if len(tokens["eos"]) > 1:
            raise _refuse(f"eos_token_id {tokens['eos']}: a spec has one end-of-sequence id")
        tokens["eos"] = tokens["eos"][0] if tokens["eos"] else None
    if config.get("pad_token_id") is not None:
        tokens["pad"] = config["pad_token_id"]
    return tokens


def _rope(config: dict) -> dict:
    # As transformers reads it (convert_rope_params_to_dict): a transformers 4 `rope_scaling`, when
    # set, replaces `rope_parameters` whole, even where both are written.
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


ROPE_SCALING_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                     "mscale_all_dim", "attention_factor", "low_freq_factor", "high_freq_factor")


def rope_scaling_section(rope: dict | None, what: str = "rope_parameters") -> dict | None:
    """The spec's `language.rope_scaling` of a transformers rope_parameters / rope_scaling dict."""
    rope = {k: v for k, v in (rope or {}).items() if k != "rope_theta"}
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise CheckpointError(f"{what}: rope_type {kind!r}: moebuild has linear, dynamic, yarn and llama3")
    unknown = sorted(rope.keys() - set(ROPE_SCALING_KEYS))
    if unknown:
        raise CheckpointError(f"{what}: {', '.join(unknown)} of {kind} rope scaling have no moebuild equivalent")
    return {"type": kind, **{k: v for k, v in rope.items() if v is not None}}


def rope_scaling_v4(scaling) -> dict | None:
    """A spec's rope_scaling in transformers 4's `rope_scaling` spelling (`type`), as the original
    DeepSeek-VL2 and MoE-LLaVA configs read it."""
    if scaling is None:
        return None
    return {"type": scaling.type, **scaling.model_dump(exclude={"type"}, exclude_none=True)}


def _refuse_unsayable(config: dict, model_type: str) -> None:
    if config.get("use_sliding_window") or (model_type == "mixtral" and config.get("sliding_window")):
        raise _refuse("sliding-window attention has no moebuild equivalent")
    if model_type == "deepseek_v3" and config.get("rope_interleave") is False:
        raise _refuse("rope_interleave: false: moebuild's DeepSeek-V3 attention uses interleaved rope")
    if model_type.startswith("deepseek") and config.get("moe_layer_freq", 1) != 1:
        raise _refuse(f"moe_layer_freq {config['moe_layer_freq']}: transformers' DeepSeek makes every layer after "
                      "first_k_dense_replace MoE")


def _family(config: dict, model_type: str) -> str:
    if model_type == "qwen2_moe":
        return "qwen2" if config.get("qkv_bias", True) else "llama"
    return {"mixtral": "llama", "qwen3_moe": "qwen3"}.get(model_type, model_type)


def _language_section(config: dict, model_type: str) -> dict:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    lang = {
        "type": _family(config, model_type), "hidden_size": hidden, "num_layers": config["num_hidden_layers"],
        "num_heads": heads, "intermediate_size": config["intermediate_size"], "vocab_size": config["vocab_size"],
        "hidden_act": config.get("hidden_act", "silu"),
        "max_position_embeddings": config["max_position_embeddings"], "rope_theta": float(_rope(config)["rope_theta"]),
        "rope_scaling": rope_scaling_section(_rope(config), f"{model_type} config"),
        "norm_eps": config.get("rms_norm_eps", 1e-6), "tie_word_embeddings": bool(config.get("tie_word_embeddings")),
    }
    if LAYOUTS[model_type].mla:
        lang["attention"] = {"type": "mla", **{key: config.get(key) for key in _MLA_KEYS}}
        lang["qkv_bias"] = bool(config.get("attention_bias"))
        return lang
    lang["attention"] = {"type": "gqa" if kv_heads != heads else "mha"}
    if kv_heads != heads:
        lang["num_kv_heads"] = kv_heads
    if config.get("head_dim") not in (None, hidden // heads):
        lang["head_dim"] = config["head_dim"]
    if model_type == "qwen3_moe":
        lang["qkv_bias"] = bool(config.get("attention_bias"))
    return lang


def _moe_layers(config: dict, model_type: str) -> list[int]:
    layers = range(config["num_hidden_layers"])
    if model_type == "mixtral":
        return list(layers)
    if model_type.startswith("deepseek"):
        return [i for i in layers if i >= (config.get("first_k_dense_replace") or 0)]
    step, dense_only = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
    return [i for i in layers if i not in dense_only and (i + 1) % step == 0]


def _layer_pattern(config: dict, model_type: str, layers: list[int]):
    if len(layers) == config["num_hidden_layers"]:
        return "all"
    if model_type.startswith("deepseek"):
        return {"first_k_dense": config["first_k_dense_replace"]}
    return layers


def _moe_section(config: dict, model_type: str) -> dict | None:
    layers = _moe_layers(config, model_type)
    num_experts = config.get("n_routed_experts") or config.get("num_local_experts") or config.get("num_experts")
    if not layers or not num_experts:
        return None
    k, act = config["num_experts_per_tok"], config.get("hidden_act", "silu")
    width = config["intermediate_size"] if model_type == "mixtral" else config["moe_intermediate_size"]
    pools = {ROUTED: {"num_experts": num_experts, "intermediate_size": width, "activation": act}}
    router: dict = {"type": "topk", "top_k": k}
    routes = [{"pool": ROUTED, "router": router}]
    balancing = []
    if model_type == "mixtral":
        router["normalize"] = True
        if config.get("router_jitter_noise"):
            router["noise"] = {"type": "jitter", "std": config["router_jitter_noise"]}
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        router["normalize"] = bool(config.get("norm_topk_prob"))
    else:
        router |= _deepseek_router(config, model_type)
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe") and config.get("router_aux_loss_coef"):
        balancing.append({"type": "load_balance", "coef": config["router_aux_loss_coef"] * k / len(layers)})
    shared = _shared_pool(config, model_type, act)
    if shared:
        pools[SHARED] = shared
        routes.append({"pool": SHARED, "router": {"type": "dense", "gate": "sigmoid" if model_type == "qwen2_moe" else "none"}})
    return {"layers": _layer_pattern(config, model_type, layers), "pools": pools, "routes": routes, "balancing": balancing}


def _deepseek_router(config: dict, model_type: str) -> dict:
    router = {"scale": float(config.get("routed_scaling_factor", 1.0))}
    groups, top_groups = config.get("n_group") or 1, config.get("topk_group") or 1
    if model_type == "deepseek_v3":
        router |= {"score": "sigmoid", "bias": True, "normalize": bool(config.get("norm_topk_prob"))}
        if groups > 1:
            router["groups"] = {"num_groups": groups, "top_groups": top_groups, "rank_by": "top2_sum",
                                "dropped_score": "-inf"}
        return router
    method = config.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise _refuse(f"DeepSeek-V2 topk_method {method!r}: transformers' DeepseekV2 has greedy and group_limited_greedy")
    if config.get("norm_topk_prob") and config["num_experts_per_tok"] > 1:
        raise _refuse("norm_topk_prob: true: transformers' DeepseekV2 ignores it (DeepSeek's code renormalises); "
                      "import the config with norm_topk_prob false or as deepseek_v3")
    if method == "group_limited_greedy":
        router["groups"] = {"num_groups": groups, "top_groups": top_groups, "rank_by": "max"}
    return router


def _shared_pool(config: dict, model_type: str, act: str) -> dict | None:
    if model_type == "qwen2_moe" and config.get("shared_expert_intermediate_size"):
        return {"num_experts": 1, "intermediate_size": config["shared_expert_intermediate_size"], "activation": act}
    if model_type.startswith("deepseek") and config.get("n_shared_experts"):
        return {"num_experts": config["n_shared_experts"], "intermediate_size": config["moe_intermediate_size"],
                "activation": act}
    return None


# ------------------------------------------------------------------------------------ spec -> config


@dataclass(frozen=True)
class _Routes:
    """A spec's MoE block read as transformers sees it: one top-k route, maybe one dense shared route."""

    routed: int
    routed_pool: str
    shared: int | None
    shared_pool: str | None


def _routes(spec: ModelSpec) -> _Routes:
    routed = [i for i, r in enumerate(spec.moe.routes) if r.router.type == "topk"]
    shared = [i for i, r in enumerate(spec.moe.routes) if r.router.type == "dense"]
    others = [r.router.type for r in spec.moe.routes if r.router.type not in ("topk", "dense")]
    if others or len(routed) != 1 or len(shared) > 1 or len(spec.moe.pools) != len(spec.moe.routes):
        raise _refuse(f"{spec.name}: transformers' MoE models have one topk route and at most one dense "
                      f"(shared) route, each over its own pool; this spec routes {[r.router.type for r in spec.moe.routes]}")
    if any(r.tokens != "all" for r in spec.moe.routes):
        raise _refuse(f"{spec.name}: every route must take all tokens")
    s = shared[0] if shared else None
    return _Routes(routed[0], spec.moe.routes[routed[0]].pool, s, None if s is None else spec.moe.routes[s].pool)


def model_type_of(spec: ModelSpec) -> str:
    """The transformers model_type a text-only spec maps onto, or a CheckpointError saying why none does."""
    if not spec.text_only:
        raise _refuse(f"{spec.name} has a vision tower: transformers' MoE LLMs are text only")
    if spec.moe is None:
        raise _refuse(f"{spec.name} has no moe section")
    lang, routes = spec.language, _routes(spec)
    if lang.type in ("deepseek_v2", "deepseek_v3"):
        if lang.attention.type != "mla":
            raise _refuse(f"{spec.name}: transformers' DeepSeek models use MLA attention")
        if routes.shared is None:
            raise _refuse(f"{spec.name}: transformers' DeepSeek models have shared experts")
        return lang.type
    if lang.type == "qwen3":
        return "qwen3_moe"
    if lang.type == "qwen2" or (lang.type == "llama" and routes.shared is not None):
        return "qwen2_moe"
    if lang.type == "llama":
        return "mixtral"
    raise _refuse(f"{spec.name}: language type {lang.type} has no transformers MoE model")


def _check_router(spec: ModelSpec, model_type: str, routes: _Routes) -> dict:
    """The router's config fields, or a refusal naming what transformers' router would do differently."""
    r = spec.moe.routes[routes.routed].router
    want = {"mixtral": dict(score="softmax", bias=False, groups=None, scale=1.0),
            "qwen2_moe": dict(score="softmax", bias=False, groups=None, scale=1.0),
            "qwen3_moe": dict(score="softmax", bias=False, groups=None, scale=1.0),
            "deepseek_v2": dict(score="softmax", bias=False),
            "deepseek_v3": dict(score="sigmoid", bias=True)}[model_type]
    problems = [f"{key} {getattr(r, key)!r} (transformers: {value!r})" for key, value in want.items()
                if getattr(r, key) != value]
    common = dict(order="softmax_topk", capacity=None, curriculum=None, expert_dropout=0.0, dtype="float32")
    problems += [f"{key} {getattr(r, key)!r}" for key, value in common.items() if getattr(r, key) != value]
    jitter = model_type == "mixtral" and r.noise is not None and r.noise.type == "jitter"
    if r.noise is not None and r.noise.type != "none" and not jitter:
        problems.append(f"noise {r.noise.type}")
    if model_type == "mixtral" and not r.normalize:
        problems.append("normalize false (Mixtral renormalises its top-k)")
    if model_type == "deepseek_v2" and r.normalize:
        problems.append("normalize true (transformers' DeepseekV2 never renormalises)")
    if r.groups is not None:
        rank, dropped = {"deepseek_v2": ("max", "zero"), "deepseek_v3": ("top2_sum", "-inf")}[model_type]
        if (r.groups.rank_by, r.groups.dropped_score) != (rank, dropped):
            problems.append(f"groups ranked by {r.groups.rank_by} with dropped_score {r.groups.dropped_score} "
                            f"(transformers: {rank}, {dropped})")
    if problems:
        raise _refuse(f"{spec.name}: transformers' {model_type} router differs: " + "; ".join(problems))
    fields = {"num_experts_per_tok": r.top_k} | ({} if model_type == "mixtral" else {"norm_topk_prob": r.normalize})
    if model_type.startswith("deepseek"):
        fields["routed_scaling_factor"] = r.scale
        groups = r.groups
        fields |= {"n_group": groups.num_groups if groups else 1, "topk_group": groups.top_groups if groups else 1}
        if model_type == "deepseek_v2":
            fields["topk_method"] = "group_limited_greedy" if groups else "greedy"
    if jitter:
        fields["router_jitter_noise"] = r.noise.std if r.noise.std is not None else 0.01
    return fields


def _check_pools(spec: ModelSpec, model_type: str, routes: _Routes) -> None:
    act = spec.language.hidden_act or "silu"
    problems = [f"pool {name}: {what}" for name, pool in spec.moe.pools.items() for what, bad in (
        ("ungated or biased experts", not pool.gated or pool.bias),
        (f"activation {pool.activation} (the decoder's is {act})", pool.activation != act),
    ) if bad]
    if routes.shared is not None:
        shared_pool, gate = spec.moe.pools[routes.shared_pool], spec.moe.routes[routes.shared].router.gate
        if model_type == "qwen2_moe" and (shared_pool.num_experts != 1 or gate != "sigmoid"):
            problems.append("Qwen2-MoE's shared expert is one expert behind a sigmoid gate")
        if model_type.startswith("deepseek") and (gate != "none" or shared_pool.intermediate_size
                                                    != spec.moe.pools[routes.routed_pool].intermediate_size):
            problems.append("DeepSeek's shared experts are ungated and as wide as the routed ones")
    elif model_type == "qwen2_moe":
        problems.append("Qwen2-MoE has a shared expert")
    moe_layers = spec.moe_layers()
    if model_type == "mixtral" and len(moe_layers) != spec.language.num_layers:
        problems.append("Mixtral has MoE in every layer")
    if model_type.startswith("deepseek") and moe_layers != list(range(moe_layers[0], spec.language.num_layers)):
        problems.append("DeepSeek's MoE layers are all layers after the first k")
    if problems:
        raise _refuse(f"{spec.name} does not map onto transformers' {model_type}: " + "; ".join(problems))


def config_from_spec(spec: ModelSpec) -> dict:
    """The transformers config.json (plain dict) of a spec that maps onto one of its MoE models."""
    model_type = model_type_of(spec)
    lang, routes = spec.language, _routes(spec)
    _check_pools(spec, model_type, routes)
    routed = spec.moe.pools[routes.routed_pool]
    heads = lang.num_heads
    config = {
        "model_type": model_type, "architectures": [LAYOUTS[model_type].architecture],
        "hidden_size": lang.hidden_size, "num_hidden_layers": lang.num_layers, "num_attention_heads": heads,
        "num_key_value_heads": lang.num_kv_heads or heads, "vocab_size": lang.vocab_size,
        "hidden_act": lang.hidden_act or "silu", "max_position_embeddings": lang.max_position_embeddings,
        "rope_parameters": {"rope_theta": lang.rope_theta, "rope_type": "default"} if lang.rope_scaling is None
        else lang.rope_scaling.rope_parameters(lang.rope_theta), "rms_norm_eps": lang.norm_eps,
        "tie_word_embeddings": lang.tie_word_embeddings, "intermediate_size": lang.intermediate_size,
        "bos_token_id": spec.tokens.bos, "eos_token_id": spec.tokens.eos,
        # only a pad the spec sets: transformers makes pad_token_id the embedding's padding_idx
        # (no gradient), and a config without one (Mixtral's) must not gain id 0 as padding
        **({"pad_token_id": spec.tokens.pad} if "pad" in spec.tokens.model_fields_set else {}),
        **_check_router(spec, model_type, routes),
    }
    if lang.attention.type == "mla":
        config |= lang.attention.model_dump(exclude={"type"}) | {"attention_bias": bool(lang.qkv_bias)}
    elif lang.head_dim:
        config["head_dim"] = lang.head_dim
    moe_layers = spec.moe_layers()
    balance = [term for term in spec.moe.balancing if term.type == "load_balance"]
    if balance and model_type != "deepseek_v2" and model_type != "deepseek_v3":
        config["router_aux_loss_coef"] = balance[0].coef * len(moe_layers) / config["num_experts_per_tok"]
    if model_type == "mixtral":
        config |= {"num_local_experts": routed.num_experts, "intermediate_size": routed.intermediate_size}
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        config |= {"num_experts": routed.num_experts, "moe_intermediate_size": routed.intermediate_size,
                   "decoder_sparse_step": 1, "mlp_only_layers": sorted(set(range(lang.num_layers)) - set(moe_layers))}
        if model_type == "qwen2_moe":
            config |= {"qkv_bias": lang.type == "qwen2",
                       "shared_expert_intermediate_size": spec.moe.pools[routes.shared_pool].intermediate_size}
        else:
            config["attention_bias"] = bool(lang.qkv_bias)
    else:
        config |= {"n_routed_experts": routed.num_experts, "moe_intermediate_size": routed.intermediate_size,
                   "n_shared_experts": spec.moe.pools[routes.shared_pool].num_experts,
                   "first_k_dense_replace": moe_layers[0]}
    return config


def untranslated(spec: ModelSpec) -> list[str]:
    """Training-only parts of a spec that an exported transformers config does not carry."""
    model_type = model_type_of(spec)
    keeps_load_balance = model_type in ("mixtral", "qwen2_moe", "qwen3_moe")
    seen_balance = False
    lost = []
    for term in spec.moe.balancing:
        if term.type == "load_balance" and keeps_load_balance and not seen_balance and term.tokens == "all":
            seen_balance = True
            continue
        lost.append(f"balancing term {term.type}")
    return lost


# ------------------------------------------------------------------------------------ tensors


def _moe_prefixes(layer: int, model_type: str) -> tuple[str, str]:
    """(on-disk, in-memory) prefix of a layer's MoE block."""
    return f"model.layers.{layer}.{LAYOUTS[model_type].moe_key}.", f"model.layers.{layer}.mlp."


def _read_experts(source: TensorSource, disk: str, memory: str, names, num_experts: int):
    if memory + "experts.gate_up_proj" in source:
        return source.take(memory + "experts.gate_up_proj"), source.take(memory + "experts.down_proj")
    gate, up, down = ([source.take(f"{disk}experts.{e}.{name}.weight") for e in range(num_experts)] for name in names)
    if any(t is None for t in gate + up + down):
        return None, None
    return torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)]), torch.stack(down)


def _read_mlp(source: TensorSource, prefix: str, parts: int):
    """A dense SwiGLU MLP as `parts` stacked experts (DeepSeek's fused shared experts)."""
    gate, up, down = (source.take(f"{prefix}{name}.weight") for name in FFN)
    if gate is None or up is None or down is None:
        return None, None
    gate_up = torch.stack([torch.cat([g, u]) for g, u in zip(gate.chunk(parts), up.chunk(parts))])
    return gate_up, torch.stack(down.chunk(parts, dim=1))


def to_moebuild(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A transformers checkpoint's tensors (on-disk or in-memory naming) -> moebuild's state dict."""
    model_type, routes = model_type_of(spec), _routes(spec)
    layout = LAYOUTS[model_type]
    source = TensorSource(state, f"the {model_type} checkpoint")
    # DeepSeek-V3 checkpoints carry num_nextn_predict_layers multi-token-prediction layers after the
    # decoder; transformers' model has no place for them, nor has moebuild's.
    source.skip(key for key in state if key.startswith("model.layers.")
                and int(key.split(".")[2]) >= spec.language.num_layers)
    out: dict[str, torch.Tensor | None] = {}
    moe_layers = set(spec.moe_layers())
    moe_prefixes = tuple(p for i in moe_layers for p in _moe_prefixes(i, model_type))
    for key in state:
        if key.startswith(moe_prefixes) or key in source.taken:
            continue
        if key.startswith("model."):
            out["language." + key] = source.take(key)
        elif key == "lm_head.weight":
            out["language.lm_head.weight"] = source.take(key)
    if spec.language.tie_word_embeddings:
        out.setdefault("language.lm_head.weight", out.get("language.model.embed_tokens.weight"))
    for i in sorted(moe_layers):
        disk, memory = _moe_prefixes(i, model_type)
        ours = f"language.model.layers.{i}.mlp."
        router = memory + "gate." if memory + "gate.weight" in source else disk + "gate."
        out[f"{ours}routes.{routes.routed}.router.weight"] = source.take(router + "weight")
        if spec.moe.routes[routes.routed].router.bias:
            out[f"{ours}routes.{routes.routed}.router.e_score_correction_bias"] = source.take(
                router + "e_score_correction_bias")
        pool = spec.moe.pools[routes.routed_pool]
        gate_up, down = _read_experts(source, disk, memory, layout.expert_names, pool.num_experts)
        out[f"{ours}pools.{routes.routed_pool}.gate_up_proj"], out[f"{ours}pools.{routes.routed_pool}.down_proj"] = gate_up, down
        if routes.shared is not None:
            parts = spec.moe.pools[routes.shared_pool].num_experts
            gate_up, down = _read_mlp(source, f"{memory}{layout.shared_key}.", parts)
            out[f"{ours}pools.{routes.shared_pool}.gate_up_proj"], out[f"{ours}pools.{routes.shared_pool}.down_proj"] = gate_up, down
            if layout.shared_gate_key:
                out[f"{ours}routes.{routes.shared}.router.weight"] = source.take(f"{memory}{layout.shared_gate_key}.weight")
    return check_complete(out, spec, source)


def from_moebuild(state: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """moebuild's state dict -> (transformers config.json, its tensors in the on-disk naming)."""
    config = config_from_spec(spec)
    model_type, routes = config["model_type"], _routes(spec)
    layout = LAYOUTS[model_type]
    source = TensorSource(state, "the moebuild model")
    out: dict[str, torch.Tensor] = {}
    moe_layers = set(spec.moe_layers())
    for key in state:
        if any(key.startswith(f"language.model.layers.{i}.mlp.") for i in moe_layers):
            continue
        if key == "language.lm_head.weight" and spec.language.tie_word_embeddings:
            source.skip([key])
        elif key.startswith("language."):
            out[key.removeprefix("language.")] = source.take(key)
    gate_name, up_name, down_name = layout.expert_names
    for i in sorted(moe_layers):
        ours, (disk, _) = f"language.model.layers.{i}.mlp.", _moe_prefixes(i, model_type)
        out[disk + "gate.weight"] = source.take(f"{ours}routes.{routes.routed}.router.weight")
        if model_type == "deepseek_v3":
            out[disk + "gate.e_score_correction_bias"] = source.take(
                f"{ours}routes.{routes.routed}.router.e_score_correction_bias")
        gate_up = source.take(f"{ours}pools.{routes.routed_pool}.gate_up_proj")
        down = source.take(f"{ours}pools.{routes.routed_pool}.down_proj")
        for e, (gu, d) in enumerate(zip(gate_up, down) if gate_up is not None and down is not None else ()):
            gate, up = gu.chunk(2)
            out |= {f"{disk}experts.{e}.{gate_name}.weight": gate.contiguous(),
                    f"{disk}experts.{e}.{up_name}.weight": up.contiguous(), f"{disk}experts.{e}.{down_name}.weight": d}
        gate_up = source.take(f"{ours}pools.{routes.shared_pool}.gate_up_proj") if routes.shared is not None else None
        down = source.take(f"{ours}pools.{routes.shared_pool}.down_proj") if routes.shared is not None else None
        if gate_up is not None and down is not None:
            gates, ups = zip(*(gu.chunk(2) for gu in gate_up))
            prefix = f"{disk}{layout.shared_key}."
            out |= {prefix + "gate_proj.weight": torch.cat(gates), prefix + "up_proj.weight": torch.cat(ups),
                    prefix + "down_proj.weight": torch.cat(list(down), dim=1)}
            if layout.shared_gate_key:
                out[f"{disk}{layout.shared_gate_key}.weight"] = source.take(f"{ours}routes.{routes.shared}.router.weight")
    source.check_total(spec.name)
    return config, out
