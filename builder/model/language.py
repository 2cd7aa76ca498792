"""Language backbones from transformers decoder families, with chosen FFNs replaced by MoE layers.

Follows transformers 5.x `LlamaModel` / `Qwen2Model` / `StableLmModel` / `PhiModel` /
`DeepseekV2Model` and their `*ForCausalLM` heads, reusing their attention, rotary, norm and
MLP classes, `DynamicCache` and `masking_utils.create_causal_mask`. Only the decoder layer and
the stack are owned here: transformers' layers call `self.mlp(hidden_states)`, so a token's
modality and padding could not reach an MoE layer through them. Parameter names match the
transformers `*ForCausalLM` state dict (`model.*`, `lm_head.*`), so its weights load strictly.

Legend: B batch, S sequence (the tokens of this call), D hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer

from moebuild.model.compat import cache_kwargs
from moebuild.model.families import Family, attention_kind, get_family

_MLA_KEYS = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def _head_kwargs(family: str, fam: Family, attention: dict, hidden_size: int, num_heads: int,
                 num_kv_heads: int, head_dim: int | None) -> dict[str, Any]:
    kind, params = attention["type"], {k: v for k, v in attention.items() if k != "type"}
    if kind == "mla":
        if "mla" not in fam.attention:
            raise ValueError(f"attention type mla is not available for family {family!r}")
        missing = {"kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"} - params.keys()
        if missing or params.keys() - set(_MLA_KEYS):
            raise ValueError(f"mla attention takes {', '.join(_MLA_KEYS)} (missing: {sorted(missing)})")
        if num_kv_heads != num_heads or head_dim is not None:
            raise ValueError("mla attention sets its head dims itself and has one latent per query head: "
                             "leave head_dim unset and num_kv_heads == num_heads")
        return {"use_mla": True, "q_lora_rank": None, **params}
    if kind not in ("mha", "gqa") or params:
        raise ValueError(f"attention must be {{type: mha | gqa | mla, ...}}, got {attention!r}")
    if "mha" not in fam.attention:
        raise ValueError(f"family {family!r} has mla attention only, got {kind}")
    if kind == "mha" and num_kv_heads != num_heads:
        raise ValueError(f"mha attention needs num_kv_heads == num_heads, got {num_kv_heads} and {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    default_dim = hidden_size // num_heads
    if head_dim not in (None, default_dim) and not fam.facts.free_head_dim:
        raise ValueError(f"family {family!r} fixes head_dim to hidden_size // num_heads = {default_dim}")
    head_dim = head_dim or default_dim
    if "mla" in fam.attention:
        # DeepseekV2Config derives head_dim from qk_rope_head_dim; LlamaAttention then reads head_dim.
        return {"use_mla": False, "q_lora_rank": None, "qk_rope_head_dim": head_dim,
                "qk_nope_head_dim": 0, "v_head_dim": head_dim}
    return {"head_dim": head_dim} if fam.facts.free_head_dim else {}


def make_hf_config(family: str, *, hidden_size: int, num_layers: int, num_heads: int,
                   num_kv_heads: int | None = None, intermediate_size: int, vocab_size: int,
                   head_dim: int | None = None, attention: dict | None = None,
                   rope_theta: float | None = None, rope_scaling: dict | None = None,
                   partial_rotary_factor: float | None = None,
                   max_position_embeddings: int = 4096, norm_eps: float | None = None,
                   qkv_bias: bool | None = None, tie_word_embeddings: bool = False,
                   **family_extras: Any) -> PretrainedConfig:
    """The family's transformers config from plain numbers; None keeps the family's default.

    `attention` is {type: mha | gqa} or {type: mla, kv_lora_rank, q_lora_rank, qk_rope_head_dim,
    qk_nope_head_dim, v_head_dim}. `qkv_bias` maps to the family's switch (Llama and DeepSeek's
    `attention_bias` also covers o_proj). `family_extras` go to the config unchanged (e.g.
    hidden_act, use_parallel_residual); attention runs through sdpa unless attn_implementation says.
    """
    fam = get_family(family)
    num_kv_heads = num_kv_heads or num_heads
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        attn_implementation="sdpa",
    )
    kwargs |= _head_kwargs(family, fam, attention or {"type": "mha"}, hidden_size, num_heads, num_kv_heads,
                           head_dim)
    if rope_theta is not None:
        kwargs["rope_theta"] = rope_theta
    if rope_scaling is not None:  # transformers' rope_parameters: {rope_type, rope_theta, factor, ...}
        kwargs["rope_scaling"] = rope_scaling
    if partial_rotary_factor is not None:
        if not fam.facts.partial_rotary:
            raise ValueError(f"family {family!r} has no partial rotary embedding")
        kwargs["partial_rotary_factor"] = partial_rotary_factor
    if norm_eps is not None:
        kwargs[fam.eps_key] = norm_eps
    if fam.qkv_bias_key is not None and qkv_bias is not None:
        kwargs[fam.qkv_bias_key] = qkv_bias
    elif qkv_bias is not None and qkv_bias != fam.facts.fixed_qkv_bias:
        raise ValueError(f"family {family!r} always has qkv_bias={fam.facts.fixed_qkv_bias}")
    return fam.config_cls(**(kwargs | family_extras))


@dataclass
class LayerRouterStats:
    """One MoE layer's router statistics, tagged with the decoder layer they come from."""

    layer_idx: int
    stats: Any


@dataclass
class LanguageOutput:
    last_hidden_state: torch.Tensor
    cache: DynamicCache | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each balancing term summed over the MoE layers (computed per layer, never pooled across layers)."""
    router_stats: list[LayerRouterStats] = field(default_factory=list)  # with output_router_stats=True only


class DecoderLayer(GradientCheckpointingLayer):
    """One decoder block of a family; its FFN (`mlp`) is the family's dense MLP or a given MoE layer.

    Sequential families: h = x + attn(ln1(x)); out = h + ffn(ln2(h)).
    Parallel families (Phi, StableLM with use_parallel_residual): out = x + attn(ln(x)) + ffn(ln(x)).
    """

    def __init__(self, config: PretrainedConfig, fam: Family, layer_idx: int, moe: nn.Module | None):
        super().__init__()
        attention_cls, _ = fam.attention[attention_kind(config)]
        eps = getattr(config, fam.eps_key)
        self.self_attn = attention_cls(config, layer_idx=layer_idx)
        self.is_moe = moe is not None
        self.mlp = moe if moe is not None else fam.mlp_cls(config)
        self.input_layernorm = fam.norm_cls(config.hidden_size, eps=eps)
        self.parallel = fam.parallel_residual(config)
        if not self.parallel:
            self.post_attention_layernorm = fam.norm_cls(config.hidden_size, eps=eps)
        self.attn_dropout = getattr(config, fam.attn_dropout_key) if fam.attn_dropout_key else 0.0
        self.mlp_dropout = getattr(config, fam.mlp_dropout_key) if fam.mlp_dropout_key else 0.0

    def _ffn(self, h_BSD: torch.Tensor, modality_BS: torch.Tensor | None, token_mask_BS: torch.Tensor | None,
             output_router_stats: bool, output_aux_losses: bool) -> tuple[torch.Tensor, Any]:
        if not self.is_moe:
            return _dropout(self.mlp(h_BSD), self.mlp_dropout, self.training), None
        out = self.mlp(h_BSD, modality_BS=modality_BS, attention_mask_BS=token_mask_BS,
                       output_router_stats=output_router_stats, output_aux_losses=output_aux_losses)
        return _dropout(out.hidden_states, self.mlp_dropout, self.training), out

    def forward(self, x_BSD: torch.Tensor, *, position_embeddings: Any, attention_mask: Any,
                position_ids: torch.Tensor, cache: DynamicCache | None, use_cache: bool,
                modality_BS: torch.Tensor | None, token_mask_BS: torch.Tensor | None,
                output_router_stats: bool, output_aux_losses: bool = True) -> tuple[torch.Tensor, Any]:
        normed_BSD = self.input_layernorm(x_BSD)
        attn_BSD, _ = self.self_attn(
            hidden_states=normed_BSD, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, position_embeddings=position_embeddings, **cache_kwargs(cache),
        )
        attn_BSD = _dropout(attn_BSD, self.attn_dropout, self.training)
        if self.parallel:
            ffn_BSD, moe_out = self._ffn(normed_BSD, modality_BS, token_mask_BS, output_router_stats,
                                         output_aux_losses)
            return x_BSD + attn_BSD + ffn_BSD, moe_out
        h_BSD = x_BSD + attn_BSD
        ffn_BSD, moe_out = self._ffn(self.post_attention_layernorm(h_BSD), modality_BS, token_mask_BS,
                                     output_router_stats, output_aux_losses)
        return h_BSD + ffn_BSD, moe_out


class DecoderStack(nn.Module):
    """Embedding, decoder layers, final norm and rotary table: the transformers `*Model` part."""

    def __init__(self, config: PretrainedConfig, fam: Family, ffn_factory: Callable[[int], nn.Module | None]):
        super().__init__()
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            raise ValueError("sliding-window attention layers are not supported")
        self.config = config
        self.final_norm_name = fam.final_norm_name
        self.embed_dropout = getattr(config, fam.embed_dropout_key) if fam.embed_dropout_key else 0.0
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DecoderLayer(config, fam, i, ffn_factory(i)) for i in range(config.num_hidden_layers)
        )
        self.add_module(fam.final_norm_name, fam.norm_cls(config.hidden_size, eps=getattr(config, fam.eps_key)))
        _, rotary_cls = fam.attention[attention_kind(config)]
        self.rotary_emb = rotary_cls(config=config)

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self, self.final_norm_name)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # F.dropout is an op call even when it does nothing: nine of them per decode step of a 4-layer model
    return F.dropout(x, p, True) if training and p > 0 else x


def _current_token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """The 2-D padding mask of this call's tokens: a cached call's mask also spans the past keys."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:]


def _merge_aux(total: dict[str, torch.Tensor], layer: dict[str, torch.Tensor]) -> None:
    for name, value in layer.items():
        total[name] = total[name] + value if name in total else value


class LanguageModel(nn.Module):
    """A family's decoder with causal-LM head; layer i's FFN is `ffn_factory(i)` when that is not None.

    An MoE FFN is called as `ffn(h_BSD, modality_BS=..., attention_mask_BS=..., output_router_stats=...,
    output_aux_losses=...)`
    and returns an object with `hidden_states`, `aux_losses` (name -> tensor) and `router_stats`
    (looked at only when asked for).
    """

    def __init__(self, hf_config: PretrainedConfig, family: str,
                 ffn_factory: Callable[[int], nn.Module | None] = lambda i: None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 lm_head_bias: bool | None = None):
        super().__init__()
        fam = get_family(family)
        lm_head_bias = fam.facts.lm_head_bias if lm_head_bias is None else lm_head_bias
        if not isinstance(hf_config, fam.config_cls):
            raise TypeError(f"family {family!r} needs a {fam.config_cls.__name__}, got {type(hf_config).__name__}")
        self.config = hf_config
        self.family = family
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.model = DecoderStack(hf_config, fam, ffn_factory)
            self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=lm_head_bias)
        if hf_config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if dtype is not None:
            self.cast_weights(dtype)

    def cast_weights(self, dtype: torch.dtype) -> None:
        """Parameters and floating buffers in `dtype`, except the rotary table, which stays fp32 as in
        transformers (its inverse frequencies lose digits in bf16), and routers' balancing state."""
        for module in (self.model.embed_tokens, self.model.layers, self.model.final_norm, self.lm_head):
            module.to(dtype)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids_BS)

    def logits(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_BSD)

    def forward(self, inputs_embeds_BSD: torch.Tensor, attention_mask_BS: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: DynamicCache | None = None,
                use_cache: bool = False, cache_position: torch.Tensor | None = None,
                modality_BS: torch.Tensor | None = None, output_router_stats: bool = False,
                output_aux_losses: bool = True) -> LanguageOutput:
        """`attention_mask_BS` covers past and current tokens (1 keep, 0 padding), as in transformers;
        `modality_BS` and the padding mask handed to MoE layers cover this call's tokens only.
        `cache_position` (dropped by transformers 5) only stands in for missing position_ids."""
        stack, seq_len = self.model, inputs_embeds_BSD.shape[1]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None and cache_position is not None:
            position_ids = cache_position.unsqueeze(0)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(seq_len, device=inputs_embeds_BSD.device) + past_seen).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds_BSD, attention_mask=attention_mask_BS,
            position_ids=position_ids, **cache_kwargs(cache),
        )
        h_BSD = _dropout(inputs_embeds_BSD, stack.embed_dropout, self.training)
        position_embeddings = stack.rotary_emb(h_BSD, position_ids)
        token_mask_BS = _current_token_mask(attention_mask_BS, seq_len)
        aux_losses: dict[str, torch.Tensor] = {}
        router_stats: list[LayerRouterStats] = []
        for i, layer in enumerate(stack.layers):
            h_BSD, moe_out = layer(
                h_BSD, position_embeddings=position_embeddings, attention_mask=causal_mask,
                position_ids=position_ids, cache=cache, use_cache=use_cache,
                modality_BS=modality_BS, token_mask_BS=token_mask_BS, output_router_stats=output_router_stats,
                output_aux_losses=output_aux_losses,
            )
            if moe_out is not None:
                _merge_aux(aux_losses, moe_out.aux_losses)
                if output_router_stats:
                    router_stats.append(LayerRouterStats(i, moe_out.router_stats))
        return LanguageOutput(stack.final_norm(h_BSD), cache, aux_losses, router_stats)
