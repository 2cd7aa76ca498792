"""Golden files for moebuild's DeepSeek-VL2 support, computed by DeepSeek-VL2's own code.

Runs `DeepseekVLV2ForCausalLM` (github.com/deepseek-ai/DeepSeek-VL2, `deepseek_vl2/models/`:
modeling_deepseek_vl_v2.py, modeling_deepseek.py, siglip_vit.py) in a separate environment (see
README.md beside this file) at test size, in three variants that mirror the released configs:

- tiny:  `use_mla: false` (the decoder takes transformers 4.38's LlamaAttention), greedy softmax top-k;
- small: MLA with q and kv compression (q_lora_rank, kv_lora_rank), greedy softmax top-k;
- base:  MLA without q compression, `topk_method: noaux_tc` (sigmoid scores, a non-zero
  `e_score_correction_bias`, 4 groups of which 2 are kept, ranked by their top-2 sum), the top-k
  weights renormalised and scaled by 2.0.

Every variant has the released vision/connector layout: a timm SigLIP ViT (last block + final
norm, the attention-pooling head built and never called), `downsample_mlp_gelu` 2x2 with the
`image_newline` / `view_seperator` 2-D tile layout (global view first), the first decoder layer
dense, then 2 shared experts (one MLP of 2 * moe_intermediate_size) plus routed experts.

Weights: the model's own init from a fixed seed, then every parameter perturbed (norm weights
around 1, biases and the layout vectors non-zero, routers scaled up so that routing is decided by
clear margins). The script checks those margins (k-th vs (k+1)-th selection score, kept vs dropped
group) over every routed token and stops if one is under MARGIN, so the golden routing cannot flip
under float noise in another implementation.

xformers is not installed (CPU): siglip_vit.Attention imports `memory_efficient_attention` from
it inside forward. A shim module `xformers.ops` is put in sys.modules whose
`memory_efficient_attention(q, k, v, p)` is the same softmax attention written out ([B, N, H, D]
layout, scale D**-0.5, no mask, dropout p = 0 in eval): see `_install_xformers_shim`.

Inputs per variant: `text` (2 sequences of token ids, no images) and `image` (2 sequences: the
first with one picture tiled 2x1 (columns x rows), the second with two pictures, 1x2 and 1x1),
passed as the original expects: `images` [batch, max views, 3, H, W] (global view then the local
tiles row-major, per picture), `images_seq_mask` [batch, T] and `images_spatial_crop`
[batch, max pictures, 2] = (width tiles, height tiles); image positions hold IMAGE_TOKEN in
`input_ids` (vocab_size - 1, moebuild's default placeholder). The tile is 42 px with 14 px
patches: a 3 x 3 patch grid that the connector pads to 4 x 4 (as 27 -> 28 at 384 px), 2 x 2
tokens per view.

Written per variant under OUT/<variant>/: model.safetensors (the original state dict),
config.json (the original DeepseekVLV2Config as save_pretrained writes it:
only the fields that differ from the defaults, like the released files), golden.safetensors (inputs, logits and the
intermediate vision features / input embeddings; for tiny and small also the training-mode LM loss and the
summed MoEGate aux losses, fp32).

Usage (in the golden environment): python make_golden.py --src DeepSeek-VL2-checkout --out DIR
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

SEED = 0
MARGIN = 1e-4  # smallest routing margin accepted (logits for softmax, biased scores for sigmoid)
VOCAB = 256
IMAGE_TOKEN = VOCAB - 1
TILE, PATCH = 42, 14
MAX_TILES = 9

VISION = dict(model_name="siglip_so400m_patch14_384", image_size=TILE, patch_size=PATCH, width=32, layers=2,
              heads=2, mlp_ratio=3.7362, global_pool="map", ignore_head=True, class_token=False, num_classes=0,
              weight_init="skip")
PROJECTOR = dict(projector_type="downsample_mlp_gelu", input_dim=32, n_embed=64, depth=2, mlp_ratio=1,
                 downsample_ratio=2)
LANGUAGE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=8,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
                n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1,
                routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax",
                norm_topk_prob=False, aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu",
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                attention_bias=False, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                use_cache=False, _attn_implementation="eager")
VARIANTS = {
    "tiny": dict(use_mla=False, q_lora_rank=None, kv_lora_rank=None, qk_rope_head_dim=0, qk_nope_head_dim=0,
                 v_head_dim=0),
    "small": dict(use_mla=True, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                  v_head_dim=16),
    "base": dict(use_mla=True, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                 v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, topk_method="noaux_tc",
                 scoring_func="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.0),
}
# (columns, rows) of local tiles per picture, per sequence of the image case.
PICTURES = [[(2, 1)], [(1, 2), (1, 1)]]
IMAGE_SEQ_LEN = 40


def _install_xformers_shim() -> None:
    """xformers.ops.memory_efficient_attention as plain softmax attention ([B, N, H, D] in and out)."""

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert attn_bias is None and p == 0.0, "the shim covers eval-mode, unmasked attention only"
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
        weights = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
        return (weights @ v).transpose(1, 2)  # [B, N, H, D]

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.ops = ops
    sys.modules.update({"xformers": package, "xformers.ops": ops})


def candidate_resolutions() -> list[list[int]]:
    """DeepSeek-VL2's candidate_resolutions for up to MAX_TILES tiles of TILE px, in the released order
    ((width, height) by tile count, then thinner first, wide before tall for equal shape)."""
    grids = [(c, r) for c in range(1, MAX_TILES + 1) for r in range(1, MAX_TILES // c + 1)]
    grids.sort(key=lambda g: (g[0] * g[1], min(g), g[0] > g[1]))
    return [[c * TILE, r * TILE] for c, r in grids]


def make_config(variant: str):
    from deepseek_vl2.models.modeling_deepseek_vl_v2 import DeepseekVLV2Config

    language = {**LANGUAGE, **VARIANTS[variant]}
    config = DeepseekVLV2Config(vision_config=VISION, projector_config=PROJECTOR, language_config=language,
                                tile_tag="2D", global_view_pos="head", candidate_resolutions=candidate_resolutions())
    config.language_config._attn_implementation = "eager"
    config._attn_implementation = "eager"
    return config


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter moved off its init: vectors (norms, biases, layout tokens) by N(0, 0.1) around
    their init (norm weights stay near 1), matrices by N(0, std of the init + 0.02); routers drawn
    with std 0.5 (logits of std ~4: spread, barely saturated); the correction bias drawn in [-0.1, 0.1]."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("e_score_correction_bias"):
                p.copy_((torch.rand(p.shape, generator=generator) - 0.5) * 0.2)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(noise * 0.5)
            elif p.dim() <= 1 or name.endswith(("pos_embed", "latent")):
                p.add_(noise * 0.1)
            else:
                p.add_(noise * (float(p.std()) + 0.02))


def text_inputs(generator: torch.Generator) -> dict:
    return {"input_ids": torch.randint(2, IMAGE_TOKEN, (2, 24), generator=generator)}


def tokens_per_picture(side: int, grid: tuple[int, int]) -> int:
    """prepare_inputs_embeds' layout: global view rows + newlines, separator, local grid rows + newlines."""
    cols, rows = grid
    return side * (side + 1) + 1 + (rows * side) * (cols * side + 1)


def image_inputs(generator: torch.Generator, side: int) -> dict:
    """input_ids with IMAGE_TOKEN runs, and images / images_seq_mask / images_spatial_crop as the
    original processor would batch them (pictures placed after a few text tokens, text after)."""
    batch, max_pictures = len(PICTURES), max(len(p) for p in PICTURES)
    views = [sum(c * r + 1 for c, r in pictures) for pictures in PICTURES]
    images = torch.zeros(batch, max(views), 3, TILE, TILE)
    crop = torch.zeros(batch, max_pictures, 2, dtype=torch.long)
    ids = torch.randint(2, IMAGE_TOKEN, (batch, IMAGE_SEQ_LEN), generator=generator)
    mask = torch.zeros(batch, IMAGE_SEQ_LEN, dtype=torch.bool)
    for b, pictures in enumerate(PICTURES):
        images[b, : views[b]] = torch.randn(views[b], 3, TILE, TILE, generator=generator).clamp(-1, 1)
        position = 3
        for j, grid in enumerate(pictures):
            crop[b, j] = torch.tensor(grid)
            n = tokens_per_picture(side, grid)
            mask[b, position: position + n] = True
            position += n + 2  # two text tokens between and after pictures
        assert position <= IMAGE_SEQ_LEN, position
    ids[mask] = IMAGE_TOKEN
    return {"input_ids": ids, "images": images, "images_seq_mask": mask, "images_spatial_crop": crop}


class GateRecorder:
    """Records each MoEGate's input and checks the routing margins of the scores it computes."""

    def __init__(self, model):
        from deepseek_vl2.models.modeling_deepseek import MoEGate

        self.margins: list[float] = []
        self.handles = [m.register_forward_pre_hook(self._check) for m in model.modules() if isinstance(m, MoEGate)]

    def _check(self, gate, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        logits = x @ gate.weight.float().T
        # softmax is monotone in the logits: its margins are taken there (saturated scores are ~0 apart)
        scores = logits if gate.scoring_func == "softmax" else logits.sigmoid()
        if gate.topk_method == "noaux_tc":
            scores = scores + gate.e_score_correction_bias
        assert gate.topk_method in ("greedy", "noaux_tc"), "margins are written for greedy and noaux_tc"
        if gate.n_group > 1:
            grouped = scores.view(len(x), gate.n_group, -1)
            rank = grouped.topk(2, -1).values.sum(-1) if gate.topk_method == "noaux_tc" else grouped.amax(-1)
            ordered = rank.sort(-1, descending=True).values
            self.margins.append(float((ordered[:, gate.topk_group - 1] - ordered[:, gate.topk_group]).min()))
            keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, rank.topk(gate.topk_group, -1).indices, True)
            kept = keep[..., None].expand_as(grouped).reshape(len(x), -1)
            scores = scores.masked_fill(~kept, 0.0)
            # a zero (dropped-group) score selected would make the pick among equal zeros arbitrary
            assert (scores.topk(gate.top_k, -1).values > MARGIN).all(), "a dropped group's expert would be selected"
        ordered = scores.sort(-1, descending=True).values
        self.margins.append(float((ordered[:, gate.top_k - 1] - ordered[:, gate.top_k]).min()))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def training_losses(model, text: dict, image: dict) -> dict:
    """In training mode (no dropout anywhere): the LM loss with labels = input_ids, and the sum over
    MoE layers of MoEGate's aux_loss (alpha * the sequence-level balance loss). The original adds the
    aux loss to the gradient only (AddAuxiliaryLoss), never to `loss`, so it is taken from the gates."""
    from deepseek_vl2.models.modeling_deepseek import MoEGate

    aux = []
    gates = [m for m in model.modules() if isinstance(m, MoEGate)]
    handles = [g.register_forward_hook(lambda m, a, o: aux.append(o[2])) for g in gates]
    model.train()
    losses = {}
    for case, inputs in (("text", text), ("image", image)):
        aux.clear()
        losses[f"{case}.train_lm_loss"] = model(**inputs, labels=inputs["input_ids"], use_cache=False).loss
        assert len(aux) == len(gates)
        losses[f"{case}.train_aux_loss"] = torch.stack(aux).sum()
    model.eval()
    for handle in handles:
        handle.remove()
    return losses


def run_variant(variant: str, out: Path) -> None:
    from deepseek_vl2.models.modeling_deepseek_vl_v2 import DeepseekVLV2ForCausalLM
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    config = make_config(variant)
    model = DeepseekVLV2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    perturb(model, generator)
    side = -(-(TILE // PATCH) // PROJECTOR["downsample_ratio"])  # ceil: the connector pads the grid

    recorder = GateRecorder(model)
    features = {}
    model.vision.register_forward_hook(lambda m, a, o: features.__setitem__("vision_features", o))
    golden = {}
    with torch.no_grad():
        text = text_inputs(generator)
        golden["text.input_ids"] = text["input_ids"]
        golden["text.logits"] = model(**text, use_cache=False).logits
        image = image_inputs(generator, side)
        golden |= {f"image.{k}": v for k, v in image.items()}
        golden["image.inputs_embeds"] = model.prepare_inputs_embeds(**image)
        golden["image.logits"] = model(**image, use_cache=False).logits
        golden["image.vision_features"] = features["vision_features"]
    recorder.remove()
    if config.language_config.topk_method != "noaux_tc":  # MoEGate asserts eval mode for noaux_tc
        golden |= training_losses(model, text, image)
    margin = min(recorder.margins)
    if margin < MARGIN:
        sys.exit(f"{variant}: routing margin {margin:.2e} < {MARGIN}: change SEED or the router scale")

    target = out / variant
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in golden.items()}, target / "golden.safetensors",
              metadata={"seed": str(SEED), "min_routing_margin": f"{margin:.3e}"})
    # as save_pretrained writes it (and as the released config.json files are): defaults left out
    (target / "config.json").write_text(config.to_json_string(use_diff=True))
    params = sum(v.numel() for v in state.values())
    print(f"{variant}: {params} parameters, min routing margin {margin:.3e}, "
          f"|text logits| max {golden['text.logits'].abs().max():.3f}, "
          f"|image logits| max {golden['image.logits'].abs().max():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="DeepSeek-VL2 checkout (holds deepseek_vl2/)")
    parser.add_argument("--out", type=Path, required=True, help="tests/data/golden/deepseek_vl2")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    _install_xformers_shim()
    torch.set_grad_enabled(False)
    for variant in args.variants:
        run_variant(variant, args.out)


if __name__ == "__main__":
    main()
