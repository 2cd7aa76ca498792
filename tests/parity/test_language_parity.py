"""LanguageModel with dense FFNs equals transformers' *ForCausalLM given the same weights.

Tiny random models (hidden 64, 3 layers, vocab 128), weights copied with a strict
load_state_dict (the parameter names are transformers' own), left-padded batches, and cached
decoding (prefill + 3 steps) against a full forward.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from moebuild.model.language import LanguageModel, make_hf_config

TINY = dict(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96, vocab_size=128)
MLA = dict(type="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)

# name -> (family, make_hf_config arguments, family of the transformers reference if it differs)
CASES = {
    "llama-gqa": ("llama", dict(num_kv_heads=2, attention={"type": "gqa"}, head_dim=24, qkv_bias=True), None),
    "qwen2-gqa": ("qwen2", dict(num_kv_heads=2, attention={"type": "gqa"}, rope_theta=1000.0), None),
    "qwen3-gqa": ("qwen3", dict(num_kv_heads=2, attention={"type": "gqa"}, head_dim=24), None),  # q/k norms
    "stablelm": ("stablelm", dict(qkv_bias=True, partial_rotary_factor=0.25, norm_eps=1e-5), None),
    "stablelm-parallel": ("stablelm", dict(use_parallel_residual=True), None),
    "phi": ("phi", dict(partial_rotary_factor=0.4, hidden_act="gelu_new"), None),
    # first_k_dense_replace only keeps transformers' DeepseekV2 dense; LanguageModel ignores it.
    "deepseek_v2-mla": ("deepseek_v2", dict(attention=MLA, first_k_dense_replace=3), None),
    "deepseek_v2-mla-qlora": ("deepseek_v2", dict(attention=MLA | {"q_lora_rank": 12}, first_k_dense_replace=3), None),
    "deepseek_v3-mla-qlora": ("deepseek_v3", dict(attention=MLA | {"q_lora_rank": 12}, first_k_dense_replace=3), None),
    # DeepSeek-VL2-Tiny's plain MHA is transformers' LlamaAttention, head dim apart from hidden/heads.
    "deepseek_v2-mha": ("deepseek_v2", dict(head_dim=32, first_k_dense_replace=3), "llama"),
}


def build_pair(case: str, attn: str) -> tuple[torch.nn.Module, LanguageModel]:
    family, kwargs, ref_family = CASES[case]
    torch.manual_seed(0)
    config = make_hf_config(family, **TINY, **kwargs, attn_implementation=attn)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "first_k_dense_replace"}
    ref_config = make_hf_config(ref_family, **TINY, **ref_kwargs, attn_implementation=attn) if ref_family else config
    ref = AutoModelForCausalLM.from_config(ref_config).eval()
    ours = LanguageModel(config, family).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids_BS = torch.randint(0, TINY["vocab_size"], (3, 8))
    mask_BS = torch.ones(3, 8, dtype=torch.long)
    mask_BS[0, :3] = 0
    mask_BS[2, :1] = 0
    # Positions as GenerationMixin derives them for left padding.
    position_ids_BS = (mask_BS.cumsum(-1) - 1).masked_fill(mask_BS == 0, 1)
    return ids_BS, mask_BS, position_ids_BS


def our_logits(model: LanguageModel, ids_BS, mask_BS, position_ids_BS, cache=None):
    out = model(model.embed(ids_BS), mask_BS, position_ids_BS, cache=cache, use_cache=cache is not None)
    return model.logits(out.last_hidden_state)


@pytest.fixture(params=[(case, attn) for case in CASES for attn in ("eager", "sdpa")], ids="-".join)
def pair_and_reference(request):
    """Our model, a left-padded batch, and transformers' logits for it."""
    ref, ours = build_pair(*request.param)
    ids_BS, mask_BS, position_ids_BS = batch = left_padded_batch()
    with torch.no_grad():
        expected = ref(input_ids=ids_BS, attention_mask=mask_BS, position_ids=position_ids_BS).logits
    return ours, batch, expected


@torch.no_grad()
def test_full_forward_matches_transformers(pair_and_reference):
    ours, (ids_BS, mask_BS, position_ids_BS), expected = pair_and_reference
    got = our_logits(ours, ids_BS, mask_BS, position_ids_BS)
    keep = mask_BS.bool()
    assert (got[keep] - expected[keep]).abs().max() <= 1e-5


@torch.no_grad()
def test_cached_decoding_matches_full_forward(pair_and_reference):
    ours, (ids_BS, mask_BS, position_ids_BS), expected = pair_and_reference
    prefill = 5
    cache = DynamicCache(config=ours.config)
    steps = [our_logits(ours, ids_BS[:, :prefill], mask_BS[:, :prefill], position_ids_BS[:, :prefill], cache)]
    for t in range(prefill, ids_BS.shape[1]):
        steps.append(our_logits(ours, ids_BS[:, t : t + 1], mask_BS[:, : t + 1], position_ids_BS[:, t : t + 1], cache))
    got = torch.cat(steps, dim=1)
    assert cache.get_seq_length() == ids_BS.shape[1]
    keep = mask_BS.bool()
    assert (got[keep] - expected[keep]).abs().max() <= 1e-5
