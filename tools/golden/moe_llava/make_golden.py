"""Golden files for moebuild's MoE-LLaVA support, computed by the original code.

Runs MoE-LLaVA (github.com/PKU-YuanGroup/MoE-LLaVA, `moellava/model/`) on DeepSpeed 0.9.5's MoE
(`deepspeed/moe/sharded_moe.py`: `top2gating`, `TopKGate`, `MOELayer`; `layer.py`: `MoE`;
`experts.py`: `Experts`) in a separate environment (see README.md beside this file), for two
backbones at test size: StableLM-2 (`MoELLaVAStablelmForCausalLM`, llava_stablelm_moe.py, with the
StableLM-Epoch modeling shipped in `language_model/stablelm/`) and Phi-2 (`MoELLaVAPhiForCausalLM`,
llava_phi_moe.py, with `language_model/phi/`).

The model is made the way MoE-LLaVA's stage 3 makes it (moellava/train/train.py, lines 1274-1503):
a stage-2 model (LLM + `mm_image_tower` + `mm_projector` in its config) gets
`initialize_moe_modules` (every expert a deep copy of the layer's dense MLP, `MoE(...)` from
DeepSpeed, `moe_mode: sparse`), then `initialize_vision_modules` loads the CLIP tower. Random
weights from a fixed seed, then every parameter perturbed (so biases are non-zero, norms are not
identities and the experts differ), and each router skewed towards expert 0 so that capacity 1.5
drops tokens in training. DeepSpeed's top-2 gate draws Gumbel noise on every call: each draw is
taken from a seeded generator and stored, in call order, so moebuild's router can be fed the same
noise. Written per backbone under OUT/<backbone>/: model.safetensors and config.json (their
save_pretrained), image_tower_config.json, golden.safetensors (inputs, noise, outputs).

Usage (in the golden environment): python make_golden.py --moellava SRC --deepspeed SRC --out DIR
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

SEED = 0
NOISE_SEED = 1234
TOWER_NAME = "openai/clip-vit-golden-tiny"  # build_image_tower only accepts names starting "openai"/"laion"
VOCAB = 128
IMAGE_TOKEN_INDEX = -200  # moellava/constants.py
IGNORE_INDEX = -100

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0)
LANGUAGE = {
    "stablelm": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=2, num_key_value_heads=2, hidden_act="silu", rope_pct=0.25,
                     rope_theta=10000, max_position_embeddings=4096, norm_eps=1e-5, use_qkv_bias=True,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "phi": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=2, hidden_act="gelu_new", partial_rotary_factor=0.4, rope_theta=10000.0,
                max_position_embeddings=2048, layer_norm_eps=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                attention_dropout=0.0, qk_layernorm=False, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False),
}
# The stage-3 scripts' --train_modules (scripts/v1/stablelm/finetune_moe.sh, scripts/v1/phi2/finetune_moe.sh).
TRAIN_MODULES = {"stablelm": ["gate_proj", "up_proj", "down_proj", "wg"], "phi": ["fc1", "fc2", "wg"]}
MODULES = {
    "stablelm": ("moellava.model.language_model.llava_stablelm_moe", "MoELLaVAStablelmConfig",
                 "MoELLaVAStablelmForCausalLM"),
    "phi": ("moellava.model.language_model.llava_phi_moe", "MoELLaVAPhiConfig", "MoELLaVAPhiForCausalLM"),
}
# Logit offset the skew gives expert 0 for the mean token of a layer: enough for capacity 1.5 to drop.
ROUTER_SKEW = 1.5


def check_deepspeed(checkout: Path) -> None:
    """The installed deepspeed must be 0.9.5 with MoE files identical to the v0.9.5 checkout given."""
    import deepspeed

    if deepspeed.__version__ != "0.9.5":
        sys.exit(f"deepspeed {deepspeed.__version__} is installed; MoE-LLaVA pins 0.9.5")
    installed = Path(deepspeed.__file__).parent / "moe"
    for name in ("sharded_moe.py", "layer.py", "experts.py", "mappings.py"):
        if not filecmp.cmp(installed / name, checkout / "deepspeed" / "moe" / name, shallow=False):
            sys.exit(f"installed deepspeed/moe/{name} differs from {checkout}")


def stub_imports(moellava_root: Path) -> None:
    """Import MoE-LLaVA's modules from the checkout without the package __init__ files.

    moellava/__init__.py and moellava/model/__init__.py import every model family (Qwen, MPT, MiniCPM,
    Mistral, ...); empty packages pointing at the same folders import only the two used here. timm is
    imported by multimodal_projector/{pool_block,simple_block}.py for projector types not built here
    (timm 0.6.13 needs a torchvision that does not match torch 2.13): a stand-in `Block` is enough.
    """
    for name, folder in (("moellava", "moellava"), ("moellava.model", "moellava/model")):
        package = types.ModuleType(name)
        package.__path__ = [str(moellava_root / folder)]
        sys.modules[name] = package
    for name in ("timm", "timm.models", "timm.models.vision_transformer"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["timm.models.vision_transformer"].Block = object
    sys.path.insert(0, str(moellava_root))


def init_deepspeed_groups() -> None:
    """World size 1 over gloo: MOELayer's all-to-all (sharded_moe.py `_AllToAll`) then runs as DeepSpeed
    wrote it, an exchange with one rank, i.e. the identity."""
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def install_tower_shim(clip_encoder) -> None:
    """CLIPVisionTower (multimodal_encoder/clip_encoder.py) loads its tower, config and processor by hub
    name; here the name resolves to a tiny random CLIP built from TOWER (no hub on this machine)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    def _check(name):
        if name != TOWER_NAME:
            raise ValueError(f"only {TOWER_NAME} is available here, not {name}")

    class TinyConfig(CLIPVisionConfig):
        @classmethod
        def from_pretrained(cls, name, **_):
            _check(name)
            return CLIPVisionConfig(**TOWER)

    class TinyModel(CLIPVisionModel):
        @classmethod
        def from_pretrained(cls, name, **_):
            _check(name)
            return CLIPVisionModel(CLIPVisionConfig(**TOWER))

    class TinyProcessor(CLIPImageProcessor):
        @classmethod
        def from_pretrained(cls, name, **_):
            _check(name)
            side = TOWER["image_size"]
            return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    clip_encoder.CLIPVisionConfig, clip_encoder.CLIPVisionModel = TinyConfig, TinyModel
    clip_encoder.CLIPImageProcessor = TinyProcessor


class GumbelRecorder:
    """Stands in for sharded_moe.gumbel_rsample(shape, device): the same Gumbel(0, 1) draw
    (torch.distributions.Gumbel: -log(-log(u)), u uniform clamped to (tiny, 1 - eps)) from a seeded
    generator, each draw kept in call order."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []

    def __call__(self, shape, device):
        finfo = torch.finfo(torch.float32)
        u = torch.rand(shape, generator=self.generator).clamp(finfo.tiny, 1 - finfo.eps)
        noise = -torch.log(-torch.log(u))
        self.draws.append(noise.clone())
        return noise.to(device)

    def take(self) -> list[torch.Tensor]:
        draws, self.draws = self.draws, []
        return draws


def model_args(backbone: str) -> types.SimpleNamespace:
    """train.py's ModelArguments for stage 3, as scripts/v1/<backbone>/finetune_moe.sh passes them
    (eval_capacity_factor 2.0 and min_capacity 0 are ModelArguments' defaults)."""
    return types.SimpleNamespace(
        moe_enable=True, train_modules=TRAIN_MODULES[backbone], moe_mode="sparse", moe_layers_idx=None, ep_size=1,
        top_k_experts=2, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0, use_residual=False,
        router_aux_loss_coef=0.01, num_experts=[4],
        image_tower=TOWER_NAME, video_tower=None, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, image_projector_type="mlp2x_gelu", video_projector_type="linear",
        video_global_proj=False, video_temproal_proj=False, video_spatial_proj=False,
    )


def build_stage3_model(backbone: str):
    import importlib

    module_name, config_name, model_name = MODULES[backbone]
    module = importlib.import_module(module_name)
    # A stage-2 checkpoint's config: the LLM plus the multimodal keys initialize_vision_modules wrote.
    config = getattr(module, config_name)(
        **LANGUAGE[backbone], mm_image_tower=TOWER_NAME, image_projector_type="mlp2x_gelu",
        mm_hidden_size=TOWER["hidden_size"], mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        use_mm_proj=True,
    )
    config._attn_implementation = "eager"
    model = getattr(module, model_name)(config)
    args = model_args(backbone)
    model.config.use_cache = False  # train.py line 1300
    model.initialize_moe_modules(model_args=args)
    for layer in model.get_model().layers:
        if hasattr(layer.mlp, "set_deepspeed_parallelism"):
            layer.mlp.set_deepspeed_parallelism()  # what DeepSpeed's engine does for every MoE module
    model.get_model().initialize_vision_modules(model_args=args)
    # train.py lines 1482-1503 (padding side and flags as the stage-3 run leaves them)
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_padding_side = "right"
    model.config.tune_mm_mlp_adapter = False
    model.config.freeze_mm_mlp_adapter = False
    model.config.mm_use_im_start_end = False
    model.config.mm_projector_lr = None
    model.config.mm_use_im_patch_token = False
    model.config.use_cache = True  # train.py line 1538
    return model


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.get_model().layers) if hasattr(layer.mlp, "deepspeed_moe")]


@torch.no_grad()
def perturb(model) -> None:
    """Every parameter + N(0, 0.02): non-zero biases, non-identity norms, experts that differ."""
    for param in model.parameters():
        param.add_(torch.randn_like(param) * 0.02)


@torch.no_grad()
def skew_routers(model, batch: dict) -> None:
    """Raise expert 0's logit by ROUTER_SKEW for each MoE layer's mean input token, so that in training
    (capacity 1.5) its first choices overflow and tokens are dropped."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [model.get_model().layers[i].mlp.register_forward_pre_hook(
        lambda _m, args, i=i: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).mean(0)))
        for i in moe_layers(model)]
    model.eval()
    model(**batch, use_cache=False, return_dict=True)
    for hook in hooks:
        hook.remove()
    for i, mean_D in inputs.items():
        gate = model.get_model().layers[i].mlp.deepspeed_moe.gate.wg
        gate.weight[0] += ROUTER_SKEW * mean_D / mean_D.square().sum()


def make_batches(generator: torch.Generator) -> dict:
    """Two batches of two samples each and no padding (DeepSpeed's capacity and l_aux count padding,
    moebuild's do not): text only, and one image per sample at different places in the prompt."""
    def ids(*shape):  # ids 3 .. VOCAB - 2: no bos/eos/pad, never moebuild's placeholder id (VOCAB - 1)
        return torch.randint(3, VOCAB - 1, shape, generator=generator)

    text_ids = ids(2, 12)
    image_ids = ids(2, 9)
    image_ids[0, 1] = IMAGE_TOKEN_INDEX
    image_ids[1, 5] = IMAGE_TOKEN_INDEX
    images = torch.randn(2, 3, TOWER["image_size"], TOWER["image_size"], generator=generator)
    labels = image_ids.clone()
    labels[:, :2] = IGNORE_INDEX  # the prompt part is not trained on
    labels[labels == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    return {
        "text": dict(input_ids=text_ids, attention_mask=torch.ones_like(text_ids)),
        "image": dict(input_ids=image_ids, attention_mask=torch.ones_like(image_ids), images=images),
        "labels": labels,
    }


@torch.no_grad()
def run_case(model, recorder: GumbelRecorder, layers: list[int], name: str, batch: dict, train: bool) -> dict:
    model.train(train)
    recorder.take()
    out = model(**batch, use_cache=False, return_dict=True)
    draws = recorder.take()
    if len(draws) != len(layers):
        raise RuntimeError(f"{name}: {len(draws)} Gumbel draws for {len(layers)} MoE layers")
    result = {f"{name}.logits": out.logits, f"{name}.aux_loss": out.moe_loss.reshape(()),
              f"{name}.l_aux": torch.stack([loss.reshape(()) for loss in out.moe_loss_list])}
    result.update({f"{name}.noise.layer{i}": noise for i, noise in zip(layers, draws)})
    if out.loss is not None:
        result[f"{name}.loss"] = out.loss.reshape(())
    counts = [model.get_model().layers[i].mlp.deepspeed_moe.exp_counts.tolist() for i in layers]
    print(f"{name}: top-1 counts per MoE layer (before capacity) {counts}", file=sys.stderr)
    return result


def make_backbone(backbone: str, out_dir: Path, modules) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(SEED)
    model = build_stage3_model(backbone)
    perturb(model)
    batches = make_batches(torch.Generator().manual_seed(SEED + 1))
    skew_routers(model, batches["image"])
    model.float()

    recorder = GumbelRecorder(NOISE_SEED)
    modules["sharded_moe"].gumbel_rsample = recorder  # top2gating looks it up by module global
    layers = moe_layers(model)
    golden = {f"text.{k}": v for k, v in batches["text"].items()}
    golden.update({f"image.{k}": v for k, v in batches["image"].items()})
    golden["image_train.labels"] = batches["labels"]
    golden.update(run_case(model, recorder, layers, "text", batches["text"], train=False))
    golden.update(run_case(model, recorder, layers, "image_eval", batches["image"], train=False))
    golden.update(run_case(model, recorder, layers, "image_train", {**batches["image"], "labels": batches["labels"]},
                           train=True))
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy(Path(tmp) / name, out_dir / name)
    saved = load_file(out_dir / "model.safetensors")
    own = model.state_dict()
    if saved.keys() != own.keys() or any(not torch.equal(saved[k], own[k]) for k in own):
        raise RuntimeError("save_pretrained's model.safetensors differs from the model's state_dict")
    model.get_image_tower().config.to_json_file(out_dir / "image_tower_config.json")
    save_file({k: v.contiguous() for k, v in golden.items()}, out_dir / "golden.safetensors",
              metadata={"made_by": "tools/golden/moe_llava/make_golden.py", "backbone": backbone})
    print(f"{backbone}: wrote {out_dir}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--moellava", type=Path, required=True, help="MoE-LLaVA checkout (holds moellava/)")
    parser.add_argument("--deepspeed", type=Path, required=True, help="DeepSpeed checkout at v0.9.5")
    parser.add_argument("--out", type=Path, required=True, help="tests/data/golden/moe_llava")
    parser.add_argument("--backbone", choices=[*MODULES, "all"], default="all")
    args = parser.parse_args()

    check_deepspeed(args.deepspeed)
    stub_imports(args.moellava)
    init_deepspeed_groups()
    import deepspeed.moe.sharded_moe as sharded_moe
    import moellava.model.multimodal_encoder.clip_encoder as clip_encoder

    install_tower_shim(clip_encoder)
    for backbone in MODULES if args.backbone == "all" else [args.backbone]:
        make_backbone(backbone, args.out / backbone, {"sharded_moe": sharded_moe})


if __name__ == "__main__":
    main()
