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


class RopeScalingSpec(SpecModel):
    """Rotary position scaling, as transformers' `rope_parameters` (rope_type and its fields)."""

    type: Literal["linear", "dynamic", "yarn", "llama3"]
    """linear (position interpolation), dynamic (NTK), yarn (DeepSeek-V2/V3, Qwen), llama3."""
    factor: PositiveFloat = Field(le=1024)
    """Context extension factor."""
    original_max_position_embeddings: Positions | None = None
    """Context the model was pretrained at (yarn, llama3; yarn's default: max_position_embeddings / factor)."""
    beta_fast: PositiveFloat | None = None
    """yarn: the fast boundary of the ramp (transformers' default 32)."""
    beta_slow: PositiveFloat | None = None
    """yarn: the slow boundary of the ramp (default 1)."""
    mscale: PositiveFloat | None = None
    """yarn (DeepSeek): the attention temperature's mscale."""
    mscale_all_dim: float | None = Field(default=None, ge=0)
    """yarn (DeepSeek): mscale_all_dim; with mscale it rescales the softmax too."""
    attention_factor: PositiveFloat | None = None
    """yarn: an explicit attention scaling factor."""
    low_freq_factor: PositiveFloat | None = None
    """llama3: low-frequency factor."""
    high_freq_factor: PositiveFloat | None = None
    """llama3: high-frequency factor."""

    @model_validator(mode="after")
    def _fields_of_the_type(self):
        fields = {"yarn": {"beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                           "original_max_position_embeddings"},
                  "llama3": {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}.get(self.type, set())
        stray = [k for k in ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                             "attention_factor", "low_freq_factor", "high_freq_factor")
                 if getattr(self, k) is not None and k not in fields]
        if stray:
            raise ValueError(f"rope scaling {self.type} has no {', '.join(stray)}")
        if self.type == "llama3" and None in (self.low_freq_factor, self.high_freq_factor,
                                              self.original_max_position_embeddings):
            raise ValueError("llama3 rope scaling needs low_freq_factor, high_freq_factor and "
                             "original_max_position_embeddings")
        return self

    def rope_parameters(self, rope_theta: float) -> dict:
        """transformers' rope_parameters."""
        extra = self.model_dump(exclude={"type"}, exclude_none=True)
        return {"rope_type": self.type, "rope_theta": rope_theta, **extra}


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
    rope_scaling: RopeScalingSpec | None = None
    """Rotary position scaling (linear, dynamic, yarn, llama3); null = none."""
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
