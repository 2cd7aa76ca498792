"""LanguageModel wiring: MoE slots receive modality and padding, aux losses sum per key over layers,
meta builds allocate nothing, bf16 builds keep the rotary table in fp32, configs are checked."""

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DeepseekV2Config, DynamicCache, StableLmConfig

from moebuild.model.language import LanguageModel, LayerRouterStats, make_hf_config

TINY = dict(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96, vocab_size=128)
MLA = dict(type="mla", kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)
FAMILIES = {
    "llama": ("llama", {}),
    "phi": ("phi", {}),  # parallel attention + FFN from one norm
    "stablelm": ("stablelm", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "deepseek_v2-mla": ("deepseek_v2", dict(attention=MLA)),
    "deepseek_v2-mha": ("deepseek_v2", dict(head_dim=32)),
    "deepseek_v3": ("deepseek_v3", dict(attention=MLA)),
}
MOE_LAYERS = (0, 2)


@dataclass
class StubOutput:
    hidden_states: torch.Tensor
    aux_losses: dict
    router_stats: dict


class RecordingMoE(nn.Module):
    """Applies a given dense MLP (so the model must equal the dense one) and records its call."""

    def __init__(self, dense: nn.Module, layer_idx: int):
        super().__init__()
        self.dense, self.layer_idx, self.calls = dense, layer_idx, []

    def forward(self, h_BSD, *, modality_BS=None, attention_mask_BS=None, output_router_stats=True, output_aux_losses=True):
        aux = h_BSD.pow(2).mean()
        call = dict(modality=modality_BS, mask=attention_mask_BS, aux=aux.detach(), stats=output_router_stats)
        self.calls.append(call)
        aux_losses = {"balance": aux, f"only_layer{self.layer_idx}": aux * 0 + self.layer_idx}
        return StubOutput(self.dense(h_BSD), aux_losses, {"calls": len(self.calls)})


def config_for(name: str, **extra):
    family, kwargs = FAMILIES[name]
    return family, make_hf_config(family, **TINY, **kwargs, **extra)


def dense_and_moe(name: str) -> tuple[LanguageModel, LanguageModel]:
    """Two models with the same weights; the second's MOE_LAYERS call RecordingMoE around the first's MLPs."""
    family, config = config_for(name)
    torch.manual_seed(0)
    dense = LanguageModel(config, family).eval()
    moe = LanguageModel(
        config, family, lambda i: RecordingMoE(dense.layers[i].mlp, i) if i in MOE_LAYERS else None
    ).eval()
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    assert all(".mlp." in key for key in missing + unexpected)
    return dense, moe


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_moe_slot_receives_modality_and_mask_and_sums_aux(name):
    dense, moe = dense_and_moe(name)
    ids_BS = torch.randint(0, 128, (2, 6))
    mask_BS = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    modality_BS = torch.randint(0, 2, (2, 6))
    embeds_BSD = dense.embed(ids_BS)

    expected = dense(embeds_BSD, mask_BS)
    out = moe(embeds_BSD, mask_BS, modality_BS=modality_BS, output_router_stats=True)

    keep = mask_BS.bool()
    assert (out.last_hidden_state[keep] - expected.last_hidden_state[keep]).abs().max() <= 1e-6
    assert expected.aux_losses == {} and expected.router_stats == []
    stubs = [moe.layers[i].mlp for i in MOE_LAYERS]
    for stub in stubs:
        (call,) = stub.calls
        assert call["modality"] is modality_BS and call["stats"] is True
        assert torch.equal(call["mask"], mask_BS)
    assert torch.allclose(out.aux_losses["balance"], sum(stub.calls[0]["aux"] for stub in stubs))
    assert out.aux_losses["only_layer2"] == 2 and out.aux_losses["only_layer0"] == 0
    assert [(s.layer_idx, s.stats) for s in out.router_stats] == [(0, {"calls": 1}), (2, {"calls": 1})]
    assert all(isinstance(s, LayerRouterStats) for s in out.router_stats)

    unasked = moe(embeds_BSD, mask_BS, modality_BS=modality_BS)  # router statistics are not computed
    assert unasked.router_stats == [] and [stub.calls[1]["stats"] for stub in stubs] == [False, False]
    assert torch.equal(unasked.aux_losses["balance"], out.aux_losses["balance"])


@torch.no_grad()
def test_decode_step_passes_only_the_new_tokens_mask_and_modality():
    _, moe = dense_and_moe("llama")
    ids_BS = torch.randint(0, 128, (2, 5))
    mask_BS = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = DynamicCache(config=moe.config)
    moe(moe.embed(ids_BS[:, :4]), mask_BS[:, :4], cache=cache, use_cache=True)
    step_modality_BS = torch.ones(2, 1, dtype=torch.long)
    moe(moe.embed(ids_BS[:, 4:]), mask_BS, cache=cache, use_cache=True, modality_BS=step_modality_BS)
    call = moe.layers[0].mlp.calls[-1]
    assert torch.equal(call["mask"], mask_BS[:, 4:]) and call["modality"] is step_modality_BS


def test_aux_loss_keeps_its_gradient():
    _, moe = dense_and_moe("phi")
    out = moe(moe.embed(torch.randint(0, 128, (1, 4))))
    out.aux_losses["balance"].backward()
    assert moe.model.embed_tokens.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_keeps_outputs_and_aux_gradients():
    _, moe = dense_and_moe("llama")
    embeds_BSD = moe.embed(torch.randint(0, 128, (2, 5))).detach()

    def grads(checkpointing: bool):
        for layer in moe.layers:
            layer.gradient_checkpointing = checkpointing
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        moe.zero_grad()
        out = moe.train()(embeds_BSD)
        (out.last_hidden_state.sum() + out.aux_losses["balance"]).backward()
        return [p.grad.clone() for p in moe.layers.parameters()]

    for plain, checkpointed in zip(grads(False), grads(True)):
        assert torch.allclose(plain, checkpointed, atol=1e-6)
    # One plain call, then a checkpointed forward and its recompute: the checkpoint path really ran.
    assert len(moe.layers[0].mlp.calls) == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_default_positions_with_cache_match_full_forward(name):
    family, config = config_for(name)
    torch.manual_seed(0)
    model = LanguageModel(config, family).eval()
    embeds_BSD = model.embed(torch.randint(0, 128, (2, 6)))
    with torch.no_grad():
        full = model(embeds_BSD).last_hidden_state
        cache = DynamicCache(config=config)
        first = model(embeds_BSD[:, :4], cache=cache, use_cache=True).last_hidden_state
        rest = model(embeds_BSD[:, 4:], cache=cache, use_cache=True,
                     cache_position=torch.arange(4, 6)).last_hidden_state
    assert (torch.cat([first, rest], 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("how", ["argument", "context"])
def test_meta_build_allocates_nothing(name, how):
    family, config = config_for(name)
    factory = lambda i: RecordingMoE(nn.Linear(64, 64), i) if i in MOE_LAYERS else None  # noqa: E731
    if how == "argument":
        model = LanguageModel(config, family, factory, device="meta")
    else:
        with torch.device("meta"):
            model = LanguageModel(config, family, factory)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert isinstance(model.layers[2].mlp, RecordingMoE)


@pytest.mark.parametrize("name", ["stablelm", "deepseek_v2-mla"])
@torch.no_grad()
def test_bf16_build_keeps_fp32_rotary_and_tracks_fp32_output(name):
    family, config = config_for(name)
    torch.manual_seed(0)
    fp32 = LanguageModel(config, family).eval()
    bf16 = LanguageModel(config, family, dtype=torch.bfloat16).eval()
    bf16.load_state_dict(fp32.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.model.rotary_emb.inv_freq, fp32.model.rotary_emb.inv_freq)
    ids_BS = torch.randint(0, 128, (2, 6))
    expected = fp32.logits(fp32(fp32.embed(ids_BS)).last_hidden_state)
    got = bf16.logits(bf16(bf16.embed(ids_BS)).last_hidden_state)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_tied_embeddings_share_the_head():
    family, config = config_for("llama", tie_word_embeddings=True)
    model = LanguageModel(config, family)
    assert model.lm_head.weight is model.embed_tokens.weight is model.model.embed_tokens.weight


def test_phi_head_has_bias_and_final_layernorm_name():
    family, config = config_for("phi")
    keys = LanguageModel(config, family, device="meta").state_dict().keys()
    assert {"lm_head.bias", "model.final_layernorm.weight", "model.final_layernorm.bias"} <= keys


def test_make_hf_config_maps_plain_numbers_to_family_fields():
    config = make_hf_config("stablelm", **TINY, qkv_bias=True, partial_rotary_factor=0.25, norm_eps=1e-4,
                            rope_theta=500.0, use_parallel_residual=True)
    assert isinstance(config, StableLmConfig)
    assert (config.use_qkv_bias, config.layer_norm_eps, config.use_parallel_residual) == (True, 1e-4, True)
    assert config.rope_parameters["partial_rotary_factor"] == 0.25 and config.rope_parameters["rope_theta"] == 500.0
    assert config.num_hidden_layers == 3 and config._attn_implementation == "sdpa"

    mla = make_hf_config("deepseek_v2", **TINY, attention=MLA)
    assert isinstance(mla, DeepseekV2Config) and mla.use_mla
    assert (mla.kv_lora_rank, mla.q_lora_rank, mla.qk_rope_head_dim, mla.v_head_dim) == (16, 12, 8, 12)


def test_deepseek_vl2_tiny_attention_is_plain_mha_with_head_dim_128():
    config = make_hf_config("deepseek_v2", hidden_size=1280, num_layers=1, num_heads=10, intermediate_size=6848,
                            vocab_size=129280)
    attn = LanguageModel(config, "deepseek_v2", device="meta").layers[0].self_attn
    assert not config.use_mla and attn.head_dim == 128
    assert [tuple(attn.get_submodule(n).weight.shape) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] == [
        (1280, 1280)
    ] * 4


@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        ("llama", dict(attention=MLA), "mla is not available"),
        ("llama", dict(num_kv_heads=2), "num_kv_heads == num_heads"),
        ("llama", dict(num_kv_heads=3, attention={"type": "gqa"}), "not a multiple"),
        ("llama", dict(partial_rotary_factor=0.5), "no partial rotary"),
        ("qwen2", dict(qkv_bias=False), "always has qkv_bias=True"),
        ("stablelm", dict(head_dim=32), "fixes head_dim"),
        ("deepseek_v2", dict(attention={"type": "mla", "kv_lora_rank": 16}), "missing"),
        ("deepseek_v2", dict(attention=MLA, head_dim=32), "leave head_dim unset"),
        ("gpt2", {}, "unknown language family"),
    ],
)
def test_make_hf_config_rejects_what_a_family_cannot_build(family, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_hf_config(family, **TINY, **kwargs)


def test_config_of_another_family_is_refused():
    with pytest.raises(TypeError, match="needs a PhiConfig"):
        LanguageModel(make_hf_config("llama", **TINY), "phi")
