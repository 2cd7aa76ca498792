"""Language families: which transformers pieces each decoder family is made of.

One record per family, read by `moebuild.model.language`. The pieces are transformers' own classes
(transformers 5.x `models/<family>/modeling_<family>.py`); what differs between families (norm
class, residual wiring, dropout placement, config field names) is data here, and the torch-free
facts (head bias, head_dim, partial rotary, ...) are `facts`, read from `moebuild.schemas.families`
so that the spec, the accounting and the builder share one table.
DeepSeek-V2 carries two attention kinds: MLA (transformers' DeepseekV2Attention) and the plain
multi-head attention of DeepSeek-VL2-Tiny, which its reference code (deepseek-ai/DeepSeek-VL2,
`modeling_deepseek.py`, ATTENTION_CLASSES["mha_eager"]) takes from transformers' LlamaAttention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    LlamaConfig,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
)
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds3
from transformers.models.llama import modeling_llama as llama
from transformers.models.phi import modeling_phi as phi
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.models.stablelm import modeling_stablelm as stablelm

from moebuild.schemas.families import FAMILIES as FACTS
from moebuild.schemas.families import FamilyFacts


def _never(config: PretrainedConfig) -> bool:
    return False


def _always(config: PretrainedConfig) -> bool:
    return True


def _stablelm_parallel(config: PretrainedConfig) -> bool:
    return bool(config.use_parallel_residual)


@dataclass(frozen=True)
class Family:
    """The transformers classes and config field names that make up one decoder family."""

    facts: FamilyFacts
    config_cls: type[PretrainedConfig]
    attention: dict[str, tuple[type[nn.Module], type[nn.Module]]]
    """Attention kind ("mha" also serves gqa, or "mla") -> (attention class, rotary embedding class)."""
    mlp_cls: type[nn.Module]
    norm_cls: type[nn.Module]
    eps_key: str
    qkv_bias_key: str | None = None
    """Config field switching the attention projection biases; None where the family fixes them."""
    parallel_residual: Callable[[PretrainedConfig], bool] = _never
    """True: x + attn(ln(x)) + mlp(ln(x)) from one norm (GPT-NeoX / Phi); False: pre-norm sequential."""
    final_norm_name: str = "norm"
    mlp_dropout_key: str | None = None
    attn_dropout_key: str | None = None
    embed_dropout_key: str | None = None


_LLAMA_MHA = (llama.LlamaAttention, llama.LlamaRotaryEmbedding)

FAMILIES: dict[str, Family] = {
    "llama": Family(
        facts=FACTS["llama"],
        config_cls=LlamaConfig,
        attention={"mha": _LLAMA_MHA},
        mlp_cls=llama.LlamaMLP,
        norm_cls=llama.LlamaRMSNorm,
        eps_key="rms_norm_eps",
        qkv_bias_key="attention_bias",
    ),
    "qwen2": Family(
        facts=FACTS["qwen2"],
        config_cls=Qwen2Config,
        attention={"mha": (qwen2.Qwen2Attention, qwen2.Qwen2RotaryEmbedding)},
        mlp_cls=qwen2.Qwen2MLP,
        norm_cls=qwen2.Qwen2RMSNorm,
        eps_key="rms_norm_eps",
    ),
    "qwen3": Family(
        facts=FACTS["qwen3"],
        config_cls=Qwen3Config,
        attention={"mha": (qwen3.Qwen3Attention, qwen3.Qwen3RotaryEmbedding)},
        mlp_cls=qwen3.Qwen3MLP,
        norm_cls=qwen3.Qwen3RMSNorm,
        eps_key="rms_norm_eps",
        qkv_bias_key="attention_bias",
    ),
    "stablelm": Family(
        facts=FACTS["stablelm"],
        config_cls=StableLmConfig,
        attention={"mha": (stablelm.StableLmAttention, stablelm.StableLmRotaryEmbedding)},
        mlp_cls=stablelm.StableLmMLP,
        norm_cls=nn.LayerNorm,
        eps_key="layer_norm_eps",
        qkv_bias_key="use_qkv_bias",
        parallel_residual=_stablelm_parallel,
        mlp_dropout_key="hidden_dropout",
    ),
    "phi": Family(
        facts=FACTS["phi"],
        config_cls=PhiConfig,
        attention={"mha": (phi.PhiAttention, phi.PhiRotaryEmbedding)},
        mlp_cls=phi.PhiMLP,
        norm_cls=nn.LayerNorm,
        eps_key="layer_norm_eps",
        parallel_residual=_always,
        final_norm_name="final_layernorm",
        mlp_dropout_key="resid_pdrop",
        attn_dropout_key="resid_pdrop",
        embed_dropout_key="embd_pdrop",
    ),
    "deepseek_v2": Family(
        facts=FACTS["deepseek_v2"],
        config_cls=DeepseekV2Config,
        attention={"mha": _LLAMA_MHA, "mla": (ds2.DeepseekV2Attention, ds2.DeepseekV2RotaryEmbedding)},
        mlp_cls=ds2.DeepseekV2MLP,
        norm_cls=ds2.DeepseekV2RMSNorm,
        eps_key="rms_norm_eps",
        qkv_bias_key="attention_bias",
    ),
    # DeepSeek-V3 (and its MoE LLM relatives): MLA only; its attention computes what DeepSeek-V2's
    # does (equal to 1e-7 on the same weights) and caches the compressed latent.
    "deepseek_v3": Family(
        facts=FACTS["deepseek_v3"],
        config_cls=DeepseekV3Config,
        attention={"mla": (ds3.DeepseekV3Attention, ds3.DeepseekV3RotaryEmbedding)},
        mlp_cls=ds3.DeepseekV3MLP,
        norm_cls=ds3.DeepseekV3RMSNorm,
        eps_key="rms_norm_eps",
        qkv_bias_key="attention_bias",
    ),
}


def attention_kind(config: PretrainedConfig) -> str:
    """"mla" for a DeepSeek config built with latent attention, else "mha".

    `use_mla` is the field name DeepSeek-VL2's own config uses for the same switch.
    """
    return "mla" if getattr(config, "use_mla", False) else "mha"


def get_family(family: str) -> Family:
    if family not in FAMILIES:
        raise ValueError(f"unknown language family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family]
