"""The language section: a transformers decoder family built from the spec's numbers."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, PositiveFloat, model_validator

from moebuild.schemas.base import (
    Activation,
    FFNWidth,
    HeadCount,
    LayerCount,
    Positions,
    SpecModel,
    VocabSize,
    Width,
)
from moebuild.schemas.families import FAMILIES, LanguageFamily

_PARTIAL_ROTARY = sorted(name for name, facts in FAMILIES.items() if facts.partial_rotary)


class MultiHeadAttentionSpec(SpecModel):
    """Standard multi-head attention: one key/value head per query head."""

    type: Literal["mha"]
    """Selects this kind: mha."""


class GroupedQueryAttentionSpec(SpecModel):
    """Grouped-query attention: language.num_kv_heads key/value heads shared by the query heads."""

    type: Literal["gqa"]
    """Selects this kind: gqa."""


class MultiHeadLatentAttentionSpec(SpecModel):
    """DeepSeek-V2 multi-head latent attention: keys and values compressed to a shared latent."""

    type: Literal["mla"]
    """Selects this kind: mla."""
    kv_lora_rank: Width
    """Width of the compressed key/value latent (the KV cache stores it plus the RoPE key)."""
    q_lora_rank: Width | None = None
    """Width of the compressed query; null = queries projected directly."""
    qk_rope_head_dim: Width
    """Per-head dimensions that carry rotary position."""
    qk_nope_head_dim: Width
    """Per-head query/key dimensions without rotary position."""
    v_head_dim: Width
    """Per-head value dimensions."""


AttentionSpec = Annotated[
    Union[MultiHeadAttentionSpec, GroupedQueryAttentionSpec, MultiHeadLatentAttentionSpec], Field(discriminator="type")
]


class LanguageSpec(SpecModel):
    """The decoder: attention and norms from the transformers family, FFNs replaced by MoE where moe.layers says."""

    type: LanguageFamily
    """transformers model family providing attention, norms, rotary embedding and the dense MLP."""
    pretrained: str | None = None
    """Local directory of a Hugging Face checkpoint (safetensors); null = random init from the numbers."""
    hidden_size: Width
    """Model width."""
    num_layers: LayerCount
    """Number of decoder layers."""
    num_heads: HeadCount
    """Query heads per layer."""
    num_kv_heads: HeadCount | None = None
    """Key/value heads (gqa); null = num_heads."""
    head_dim: Width | None = None
    """Per-head width; null = hidden_size / num_heads (DeepSeek-VL2-Tiny sets 128 with 10 heads of a 1280 model)."""
    intermediate_size: FFNWidth
    """Width of the dense FFN (and of each expert when a pool upcycles it)."""
    vocab_size: VocabSize
    """Token vocabulary size."""
    attention: AttentionSpec = Field(default_factory=lambda: MultiHeadAttentionSpec(type="mha"))
    """Attention kind: mha, gqa or mla."""
    hidden_act: Activation | None = None
    """Activation of the dense FFN; null = the family's (silu; gelu_new for phi)."""
    max_position_embeddings: Positions = 4096
    """Longest sequence the rotary embedding is set up for."""
    rope_theta: PositiveFloat = 10000.0
    """Rotary base frequency."""
    partial_rotary_factor: float | None = Field(default=None, gt=0, le=1)
    """Share of each head that carries rotary position; null = the family's (stablelm 0.25, phi 0.4, else 1)."""
    norm_eps: PositiveFloat = 1e-5
    """Epsilon of the decoder's norms."""
    qkv_bias: bool | None = None
    """Bias on the query/key/value projections; null = the family's default."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head."""
    lm_head_bias: bool | None = None
    """Bias on the LM head; null = the family's (phi true, as microsoft/phi-2; MoE-LLaVA's Phi-2 has none)."""

    @model_validator(mode="after")
    def _head_rules(self):
        kv = self.num_kv_heads or self.num_heads
        if self.hidden_size % self.num_heads:  # transformers' llama and deepseek_v2 configs require it, head_dim or not
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % kv:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {kv}")
        if self.attention.type == "mha" and kv != self.num_heads:
            raise ValueError(f"mha attention needs num_kv_heads == num_heads ({self.num_heads}); use type: gqa")
        facts = FAMILIES[self.type]
        if self.partial_rotary_factor is not None and not facts.partial_rotary:
            raise ValueError(f"partial_rotary_factor is only for {' and '.join(_PARTIAL_ROTARY)}, not {self.type}")
        if not facts.free_head_dim and self.head_dim not in (None, self.hidden_size // self.num_heads):
            raise ValueError(f"{self.type} fixes head_dim to hidden_size / num_heads ({self.hidden_size // self.num_heads})")
        if self.qkv_bias is False and facts.fixed_qkv_bias:
            raise ValueError(f"{self.type} always has qkv biases; remove qkv_bias: false")
        return self
