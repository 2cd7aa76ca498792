"""What each language family is, as far as the spec and the accounting need to know (no torch).

One record per transformers decoder family (`modeling_<family>.py` in transformers 5.x). The
builder's `moebuild.model.families` maps the same names to transformers' classes and config keys
and reads these facts from here; `schemas/language.py` refuses what a family cannot be told and
`moebuild.accounting` counts parameters from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LanguageFamily = Literal["llama", "qwen2", "qwen3", "stablelm", "phi", "deepseek_v2", "deepseek_v3"]


@dataclass(frozen=True)
class FamilyFacts:
    norm_params: int
    """Parameters per unit of norm width: 1 for RMSNorm (weight), 2 for LayerNorm (weight and bias)."""
    parallel_residual: bool
    """x + attn(ln(x)) + mlp(ln(x)) from one norm per layer (Phi), else pre-norm sequential (two)."""
    fixed_qkv_bias: bool | None
    """The q/k/v bias the family always has; None = the spec's qkv_bias (default false)."""
    o_bias_follows_qkv: bool
    """Llama's and DeepSeek's `attention_bias` also puts a bias on o_proj; Phi's dense always has one."""
    free_head_dim: bool
    """Whether head_dim may differ from hidden_size // num_heads."""
    partial_rotary: bool
    """Whether partial_rotary_factor may be set."""
    gated_ffn: bool = True
    """gate/up/down (SwiGLU) dense FFN; false = fc1/fc2 with biases (Phi)."""
    lm_head_bias: bool = False
    mla: bool = False
    """Whether multi-head latent attention is available (DeepSeek-V2 and -V3)."""
    mha: bool = True
    """Whether plain multi-head / grouped-query attention is available (DeepSeek-V3's is MLA only)."""
    qk_norm: bool = False
    """An RMSNorm over each head's queries and keys (Qwen3: q_norm, k_norm of head_dim)."""

    @property
    def norms_per_layer(self) -> int:
        return 1 if self.parallel_residual else 2


FAMILIES: dict[str, FamilyFacts] = {
    "llama": FamilyFacts(1, False, None, True, free_head_dim=True, partial_rotary=False),
    "qwen2": FamilyFacts(1, False, True, False, free_head_dim=True, partial_rotary=False),
    "stablelm": FamilyFacts(2, False, None, False, free_head_dim=False, partial_rotary=True),
    "phi": FamilyFacts(2, True, True, True, free_head_dim=False, partial_rotary=True, gated_ffn=False,
                       lm_head_bias=True),
    "deepseek_v2": FamilyFacts(1, False, None, True, free_head_dim=True, partial_rotary=False, mla=True),
    "qwen3": FamilyFacts(1, False, None, True, free_head_dim=True, partial_rotary=False, qk_norm=True),
    "deepseek_v3": FamilyFacts(1, False, None, True, free_head_dim=True, partial_rotary=False, mla=True, mha=False),
}
