"""Parameter, FLOP and memory accounting computed from a spec alone: no torch, nothing allocated.

Parameters are counted exactly as the modules moebuild builds hold them, from the layouts of
transformers 5.x: `CLIPVisionModel` / `SiglipVisionModel` (every block kept, whatever
select_layer; SigLIP's attention-pooling head when use_head), the connectors of
`moebuild.model.connectors`, and the decoder families of `moebuild.model.language` (`modeling_<family>.py`)
with each MoE layer's FFN replaced by its expert pools (`moebuild.moe.experts`, stacked
transformers-5 layout) and each route's router as its schema class counts it (`params`: E x H for
most, E x slots x H for soft, H for a gated dense route, none for a plain dense one). Parts, named
as the modules' parameters
group: vision embeddings / norms / layers / head; connector layers; language embedding,
attention (projections and MLA's inner norms), norms, dense_ffn, experts.<pool>, routers,
lm_head (only its bias when tied to the embedding); with tiling, the connector's tile_layout
(DeepSeek-VL2's image_newline and view_separator).

Active parameters per token (the `counting` sentence in the JSON says the same):
- a token takes the routes whose `tokens` match its modality (text or image); in a pool it uses
  the most experts any matching route gives one token, as the router's schema class says
  (`experts_per_token`): every expert for dense and soft, top_k, 2 for deepspeed_top2,
  tail_top_k for dynamic_topk (LTDR's tail image tokens), max_experts for threshold, the average
  capacity_factor for expert_choice, top_groups x top_k for hierarchical (two routes over one
  pool never add up: LTDR's text top-2 and image top-4 use at most 4 experts);
  the routers of its matching routes count fully;
- the modality with more active parameters is reported (text on ties), so hard modality routing
  (image tokens to one pool, text to another) counts one pool, not both;
- everything else counts fully: attention, norms, dense FFNs, the LM head, the input embedding
  (reported apart as `embedding` so a convention can leave it out), the vision tower and the
  connector (both run for every image).
FLOPs per token: the decoder's forward, 2 per active weight element of a matmul (the LM head
included, embedding lookups, biases and norms not) plus attention scores and the weighted sum of
values against `context` keys (the last token of a `context`-long sequence; a causal average is
about half). The vision tower and connector run per image and are left out.
Published figures (`published` in the JSON): each system's own counting convention applied to the
spec (`PUBLISHED`): MoE-LLaVA's language-model-only activated count, DeepSeek-VL2's whole-model
total and activated-without-input-embedding; each entry says what it counts and how it was quoted.
KV cache: 2 * layers * kv_heads * head_dim elements per token; MLA caches the compressed latent and
the RoPE key, layers * (kv_lora_rank + qk_rope_head_dim), as transformers' DeepseekV2Attention does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moebuild.schemas import ModelSpec
from moebuild.schemas.families import FAMILIES

DEFAULT_CONTEXT = 2048
BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float8": 1, "int8": 1}
MODALITIES = ("text", "image")
COUNTING = (
    "Active = parameters one token uses: per pool all experts if a matching route is dense (or soft) else the "
    "most experts a matching route gives one token (top_k, tail_top_k, max_experts), routers of matching "
    "routes, everything else fully (input embedding included, also given apart as language.embedding; vision "
    "and connector included), for the modality with the most (text on ties); FLOPs = 2 x active matmul weights "
    "of the decoder (LM head included, embedding lookup not) + attention against {context} keys."
)


@dataclass(frozen=True)
class Part:
    """One separately reported group of parameters."""

    total: int
    active: int
    flops: int = 0
    """Forward FLOPs this part spends on one language token."""


@dataclass
class Component:
    parts: dict[str, Part]

    @property
    def total(self) -> int:
        return sum(part.total for part in self.parts.values())

    @property
    def active(self) -> int:
        return sum(part.active for part in self.parts.values())

    @property
    def flops(self) -> int:
        return sum(part.flops for part in self.parts.values())

    def to_dict(self) -> dict:
        parts = {name: {"total": p.total, "active": p.active} for name, p in self.parts.items()}
        return {"total": self.total, "active": self.active, "parts": parts}


@dataclass
class Summary:
    name: str
    context: int
    vision: Component
    connector: Component
    language: Component
    active_modality: str
    kv_cache_elements_per_token: int
    language_by_modality: dict[str, Component] = field(default_factory=dict)
    """The language component as a text token and as an image token uses it."""
    counting: str = field(init=False)

    def __post_init__(self):
        self.counting = COUNTING.format(context=self.context)

    @property
    def components(self) -> dict[str, Component]:
        """vision, connector (both left out of a text-only model) and language."""
        parts = {"vision": self.vision, "connector": self.connector}
        return {name: c for name, c in parts.items() if c.parts} | {"language": self.language}

    @property
    def total_params(self) -> int:
        return sum(c.total for c in self.components.values())

    @property
    def active_params(self) -> int:
        return sum(c.active for c in self.components.values())

    @property
    def embedding_params(self) -> int:
        return self.language.parts["embedding"].total

    @property
    def flops_per_token(self) -> int:
        return self.language.flops

    def memory_bytes(self) -> dict[str, int]:
        return {dtype: self.total_params * size for dtype, size in BYTES_PER_DTYPE.items()}

    def kv_cache_bytes_per_token(self) -> dict[str, int]:
        return {dtype: self.kv_cache_elements_per_token * size for dtype, size in BYTES_PER_DTYPE.items()}

    def to_dict(self) -> dict:
        components = {name: c.to_dict() for name, c in self.components.items()}
        components["language"]["embedding"] = self.embedding_params
        components["language"]["flops_per_token"] = self.flops_per_token
        return {
            "name": self.name,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "active_modality": self.active_modality,
            "components": components,
            "flops_per_token": self.flops_per_token,
            "context": self.context,
            "memory": self.memory_bytes(),
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token(),
            "counting": self.counting,
            "published": {key: convention.figures(self) for key, convention in PUBLISHED.items()},
        }


def _fixed(total: int) -> Part:
    return Part(total, total)


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


# ---------------------------------------------------------------- vision and connector


def _vit_block(hidden: int, intermediate: int) -> int:
    """CLIPEncoderLayer / SiglipEncoderLayer: q, k, v, out with bias, two LayerNorms, fc1/fc2."""
    return 4 * _linear(hidden, hidden) + 2 * 2 * hidden + _linear(hidden, intermediate) + _linear(intermediate, hidden)


def vision_component(vision) -> Component:
    d, patches = vision.hidden_size, (vision.image_size // vision.patch_size) ** 2
    conv = 3 * vision.patch_size**2 * d
    if vision.type == "clip":  # class_embedding, conv without bias, positions incl. CLS; pre and post LayerNorm
        parts = {"embeddings": _fixed(d + conv + (patches + 1) * d), "norms": _fixed(2 * 2 * d)}
    else:  # SigLIP: conv with bias, no CLS; post LayerNorm only
        parts = {"embeddings": _fixed(conv + d + patches * d), "norms": _fixed(2 * d)}
    parts["layers"] = _fixed(vision.num_layers * _vit_block(d, vision.intermediate_size))
    if vision.type == "siglip" and vision.use_head:
        # probe, nn.MultiheadAttention (in_proj 3D x D + bias, out_proj), LayerNorm, MLP
        head = d + _linear(d, 3 * d) + _linear(d, d) + 2 * d
        parts["head"] = _fixed(head + _linear(d, vision.intermediate_size) + _linear(vision.intermediate_size, d))
    return Component(parts)


def connector_component(connector, vision_hidden: int, hidden: int, tiling=None) -> Component:
    """The projector's layers; with tiling, DeepSeek-VL2's image_newline and view_separator (global view only)."""
    factor = connector.factor if connector.type == "downsample_mlp" else 1
    depth = connector.depth if connector.type != "linear" else 1
    first = _linear(factor * factor * vision_hidden, hidden)
    parts = {"layers": _fixed(first + (depth - 1) * _linear(hidden, hidden))}
    if tiling is not None:
        parts["tile_layout"] = _fixed(hidden * (2 if tiling.global_view else 1))
    return Component(parts)


# ---------------------------------------------------------------- language decoder


@dataclass(frozen=True)
class _Attention:
    params: int
    weights: int
    """Matmul weight elements (params less biases and norms)."""
    score_dims: int
    """Per-key multiply-adds of one token's attention: heads * (qk head dim + v head dim)."""
    kv_elements: int
    """Cached elements per token and layer."""


def _head_dim(lang) -> int:
    free = FAMILIES[lang.type].free_head_dim
    return lang.head_dim if free and lang.head_dim else lang.hidden_size // lang.num_heads


def _lm_head_bias(lang) -> bool:
    return FAMILIES[lang.type].lm_head_bias if lang.lm_head_bias is None else lang.lm_head_bias


def _qkv_bias(lang) -> bool:
    fixed = FAMILIES[lang.type].fixed_qkv_bias
    return fixed if fixed is not None else bool(lang.qkv_bias)


def _mha(lang) -> _Attention:
    """q/k/v/o projections (Llama, Qwen2, Qwen3 with its q/k norms, StableLM, Phi; DeepSeek-V2 without MLA
    takes LlamaAttention)."""
    h, hd, heads, kv = lang.hidden_size, _head_dim(lang), lang.num_heads, lang.num_kv_heads or lang.num_heads
    weights = 2 * h * heads * hd + 2 * h * kv * hd
    qkv_bias = _qkv_bias(lang)
    o_bias = qkv_bias and FAMILIES[lang.type].o_bias_follows_qkv
    biases = (heads * hd + 2 * kv * hd if qkv_bias else 0) + (h if o_bias else 0)
    qk_norms = 2 * hd if FAMILIES[lang.type].qk_norm else 0  # Qwen3's q_norm and k_norm
    return _Attention(weights + biases + qk_norms, weights, heads * 2 * hd, 2 * kv * hd)


def _mla(lang) -> _Attention:
    """DeepseekV2Attention: q (direct or low-rank with its RMSNorm), kv_a with MQA RoPE key, kv_b, o."""
    a, h, heads = lang.attention, lang.hidden_size, lang.num_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank is None:
        q_weights, q_other = h * heads * qk, 0
    else:
        q_weights, q_other = h * a.q_lora_rank + a.q_lora_rank * heads * qk, a.q_lora_rank
    kv_weights = h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * heads * (a.qk_nope_head_dim + a.v_head_dim)
    weights = q_weights + kv_weights + heads * a.v_head_dim * h
    biases = 0
    if lang.qkv_bias:  # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj
        biases = (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim + h
    params = weights + q_other + a.kv_lora_rank + biases
    return _Attention(params, weights, heads * (qk + a.v_head_dim), a.kv_lora_rank + a.qk_rope_head_dim)


def _attention(lang) -> _Attention:
    return _mla(lang) if lang.attention.type == "mla" else _mha(lang)


def _ffn_params(hidden: int, intermediate: int, gated: bool, bias: bool) -> tuple[int, int]:
    """(params, matmul weights) of one FFN / expert: gate+up+down, or fc1+fc2."""
    weights = (3 if gated else 2) * hidden * intermediate
    biases = ((2 if gated else 1) * intermediate + hidden) if bias else 0
    return weights + biases, weights


def _dense_ffn(lang) -> tuple[int, int]:
    gated = FAMILIES[lang.type].gated_ffn  # Phi's fc1/fc2 carry biases; the gated families' MLPs none
    return _ffn_params(lang.hidden_size, lang.intermediate_size, gated, bias=not gated)


def _moe_parts(spec: ModelSpec, modality: str) -> dict[str, Part]:
    """Experts per pool and routers over all MoE layers, active for a token of `modality`."""
    moe, h, n_moe = spec.moe, spec.language.hidden_size, len(spec.moe_layers())
    matching = [r for r in moe.routes if r.tokens in ("all", modality)]
    parts = {}
    for name, pool in moe.pools.items():
        per_expert, weights = _ffn_params(h, pool.intermediate_size, pool.gated, pool.bias)
        used = max((r.router.experts_per_token(pool.num_experts) for r in matching if r.pool == name), default=0)
        total = n_moe * pool.num_experts * per_expert
        parts[f"experts.{name}"] = Part(total, n_moe * used * per_expert, 2 * n_moe * used * weights)
    total = sum(r.router.params(moe.pools[r.pool].num_experts, h) for r in moe.routes)
    active = sum(r.router.params(moe.pools[r.pool].num_experts, h) for r in matching)
    parts["routers"] = Part(n_moe * total, n_moe * active, 2 * n_moe * active)
    return parts


def params_per_rank(spec: ModelSpec) -> int:
    """Parameters one process holds under `moe.parallel.expert_parallel` = N: the whole model but
    (N - 1) / N of every sharded pool's experts (N = 1: the total)."""
    total = summarize(spec).total_params
    if spec.moe is None or spec.moe.parallel.expert_parallel == 1:
        return total
    n, h, n_moe = spec.moe.parallel.expert_parallel, spec.language.hidden_size, len(spec.moe_layers())
    sharded = sum(n_moe * pool.num_experts * _ffn_params(h, pool.intermediate_size, pool.gated, pool.bias)[0]
                  for name, pool in spec.moe.pools.items() if name not in spec.moe.parallel.replicate)
    return total - sharded + sharded // n


def language_component(spec: ModelSpec, modality: str, context: int = DEFAULT_CONTEXT) -> Component:
    lang, layout = spec.language, FAMILIES[spec.language.type]
    h, vocab, n = lang.hidden_size, lang.vocab_size, lang.num_layers
    n_dense = n - len(spec.moe_layers())
    attn = _attention(lang)
    ffn, ffn_weights = _dense_ffn(lang)
    norms = (n * layout.norms_per_layer + 1) * layout.norm_params * h
    lm_head = (0 if lang.tie_word_embeddings else h * vocab) + (vocab if _lm_head_bias(lang) else 0)
    parts = {
        "embedding": _fixed(vocab * h),
        "attention": Part(n * attn.params, n * attn.params, n * 2 * (attn.weights + attn.score_dims * context)),
        "norms": _fixed(norms),
        "dense_ffn": Part(n_dense * ffn, n_dense * ffn, 2 * n_dense * ffn_weights),
    }
    if spec.moe is not None:
        parts |= _moe_parts(spec, modality)
    parts["lm_head"] = Part(lm_head, lm_head, 2 * h * vocab)  # a tied head still multiplies
    return Component(parts)


def kv_cache_elements_per_token(spec: ModelSpec) -> int:
    return spec.language.num_layers * _attention(spec.language).kv_elements


def check_context(spec: ModelSpec, context: int) -> None:
    """ValueError for a context past the model's positions (summary --context, bench model --length)."""
    limit = spec.language.max_position_embeddings
    if context > limit:
        raise ValueError(f"{context} exceeds the model's {limit} positions (language.max_position_embeddings)")


def summarize(spec: ModelSpec, context: int = DEFAULT_CONTEXT) -> Summary:
    """Parameters, active parameters, FLOPs per token at `context` keys, memory and KV cache of a spec."""
    by_modality = {m: language_component(spec, m, context) for m in MODALITIES}
    modality = max(MODALITIES, key=lambda m: by_modality[m].active)  # max keeps the first (text) on ties
    return Summary(
        name=spec.name,
        context=context,
        vision=Component({}) if spec.text_only else vision_component(spec.vision),
        connector=Component({}) if spec.text_only else connector_component(
            spec.connector, spec.vision.hidden_size, spec.language.hidden_size, spec.vision.tiling),
        language=by_modality[modality],
        language_by_modality=by_modality,
        active_modality=modality,
        kv_cache_elements_per_token=kv_cache_elements_per_token(spec),
    )


# ---------------------------------------------------------------- published conventions


@dataclass(frozen=True)
class Convention:
    """How one published system counts its headline parameter figures, applied to any spec."""

    system: str
    counting: str
    total: Callable[[Summary], int]
    activated: Callable[[Summary], int]

    def figures(self, summary: Summary) -> dict:
        return {"system": self.system, "counting": self.counting,
                "total": self.total(summary), "activated": self.activated(summary)}


PUBLISHED = {
    # MoE-LLaVA (arXiv:2401.15947) Table 1 / model cards: "activated" is the language model with its
    # embeddings, top-2 of 4 experts (2.0B / 2.2B / 3.6B: 2.060B / 2.243B / 3.619B cut to 0.1B).
    "moe_llava": Convention(
        system="MoE-LLaVA",
        counting="language model only, input embedding and LM head included; activated = a text token's "
                 "experts (top-2 of 4). Quoted figures are cut (not rounded) to 0.1B: 2.060B is "
                 "quoted 2.0B.",
        total=lambda s: s.language_by_modality["text"].total,
        activated=lambda s: s.language_by_modality["text"].active,
    ),
    # DeepSeek-VL2 (arXiv:2412.10302): totals are the checkpoints' parameter counts (3.37B / 16.1B /
    # 27.5B, rounded); activated (1.0B / 2.8B / 4.5B) = the language model's activated parameters
    # without the input embedding, as DeepSeek quotes its LLMs (0.57B / 2.4B / 4.1B, Small's being
    # DeepSeek-V2-Lite's 2.4B), plus the ~0.4B SigLIP-SO400M tower. The exact sums are 1.010B /
    # 2.893B / 4.571B: the quoted figures are those cut to 0.1B (rounding would give 2.9B and 4.6B).
    "deepseek_vl2": Convention(
        system="DeepSeek-VL2",
        counting="whole model: vision tower (with its unused pooling head), connector, newline/separator, "
                 "language model; activated leaves the input embedding out (the LM head stays in). Totals "
                 "are quoted rounded, activated figures cut to 0.1B (Small 2.893B is quoted 2.8B).",
        total=lambda s: s.total_params,
        activated=lambda s: s.active_params - s.embedding_params,
    ),
}
"""Published counting conventions by key; `summary --json` reports each under `published`."""
