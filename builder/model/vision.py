"""Vision towers: transformers' CLIP / SigLIP vision encoders, cut at the selected hidden state.

Follows LLaVA's ``CLIPVisionTower`` (llava/model/multimodal_encoder/clip_encoder.py), which
MoE-LLaVA uses unchanged: features are ``hidden_states[select_layer]`` of
``CLIPVisionModel(output_hidden_states=True)`` with the CLS token dropped for ``"patch"``.
DeepSeek-VL2 (deepseek_vl2/models/siglip_vit.py) takes SigLIP-SO400M's last block followed by
the final LayerNorm, i.e. ``last_hidden_state``: ``select_layer=-1, post_norm=True`` here.

``select_layer`` indexes transformers' ``hidden_states`` tuple, which has ``num_layers + 1``
entries: entry 0 is the embedding output (after CLIP's ``pre_layrnorm``), entry ``i`` the output
of block ``i``. The forward runs only the blocks up to the selected one: with ``-2`` the last
block is never computed. Its parameters are still built, so parameter counts and checkpoints
match the published models (the same holds for SigLIP's attention-pooling head, which is
built and never called). ``post_norm=True`` applies the tower's ``post_layernorm`` to the
selected state (only SigLIP's transformers forward does that to every token; CLIP's applies it
to the pooled CLS alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

TowerKind = Literal["clip", "siglip"]
SelectFeature = Literal["patch", "cls_patch"]

_TOWERS: dict[str, tuple[type, type]] = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
}
# Config fields a pretrained checkpoint must agree on with the numbers the caller gave.
_CHECKED_FIELDS = (
    "image_size", "patch_size", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
)


class VisionTower(nn.Module):
    """Images ``[N, 3, H, W]`` -> features ``[N, P, Dv]`` from one hidden state of a ViT."""

    @staticmethod
    def from_spec(node) -> "VisionTower":
        """The tower with random weights; a `pretrained` checkpoint is loaded by `moebuild.build`."""
        extra = {"use_head": node.use_head} if node.type == "siglip" else {}
        return build_vision_tower(
            node.type, image_size=node.image_size, patch_size=node.patch_size, hidden_size=node.hidden_size,
            num_layers=node.num_layers, num_heads=node.num_heads, intermediate_size=node.intermediate_size,
            select_layer=node.select_layer, select_feature=node.select_feature, post_norm=node.post_norm,
            hidden_act=node.hidden_act, layer_norm_eps=node.layer_norm_eps, frozen=node.frozen, **extra,
        )

    def __init__(
        self,
        vision_model: CLIPVisionModel | SiglipVisionModel,
        *,
        select_layer: int,
        select_feature: SelectFeature,
        post_norm: bool = False,
    ):
        super().__init__()
        self.vision_model = vision_model
        self.has_cls = isinstance(vision_model, CLIPVisionModel)
        num_layers = vision_model.config.num_hidden_layers
        if not -(num_layers + 1) <= select_layer <= num_layers:
            raise ValueError(
                f"select_layer {select_layer} is out of range for a tower with {num_layers} layers "
                f"(valid: {-(num_layers + 1)} .. {num_layers})"
            )
        if select_feature == "cls_patch" and not self.has_cls:
            raise ValueError("select_feature 'cls_patch' needs a CLS token; SigLIP has none (use 'patch')")
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.post_norm = post_norm
        # Number of blocks that must run: hidden_states[i] is the output of block i.
        self.num_run_layers = select_layer % (num_layers + 1)

    @property
    def hidden_size(self) -> int:
        return self.vision_model.config.hidden_size

    @property
    def num_patches(self) -> int:
        config = self.vision_model.config
        return (config.image_size // config.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per image handed to the connector."""
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> VisionTower:
        # A frozen tower keeps eval-mode semantics (no dropout) whatever the parent model does.
        return super().train(mode and not self.frozen)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A frozen tower stores no activations for backward (LLaVA runs it under no_grad too).
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._features(pixel_values)

    def _features(self, pixel_values_NCHW: torch.Tensor) -> torch.Tensor:
        model = self.vision_model
        x_NPD = model.embeddings(pixel_values_NCHW)
        if self.has_cls:
            x_NPD = model.pre_layrnorm(x_NPD)
        for layer in model.encoder.layers[: self.num_run_layers]:
            x_NPD = layer(x_NPD, None)
        if self.post_norm:
            x_NPD = model.post_layernorm(x_NPD)
        if self.has_cls and self.select_feature == "patch":
            x_NPD = x_NPD[:, 1:]
        return x_NPD


def _vision_config(kind: TowerKind, use_head: bool, **numbers) -> CLIPVisionConfig | SiglipVisionConfig:
    config_cls = _TOWERS[kind][0]
    if kind == "siglip":
        numbers["vision_use_head"] = use_head
    elif not use_head:
        raise ValueError("use_head=False applies to SigLIP only; CLIP towers have no pooling head")
    return config_cls(**numbers)


def _load_pretrained(kind: TowerKind, path: str, expected, dtype) -> nn.Module:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"vision pretrained: {path} is not a local directory")
    model_cls = _TOWERS[kind][1]
    model = model_cls.from_pretrained(
        directory, use_safetensors=True, local_files_only=True, dtype=dtype or torch.float32
    )
    fields = _CHECKED_FIELDS + (("vision_use_head",) if kind == "siglip" else ())
    mismatched = [
        f"{field}: spec {getattr(expected, field)!r}, checkpoint {getattr(model.config, field)!r}"
        for field in fields
        if getattr(model.config, field) != getattr(expected, field)
    ]
    if mismatched:
        raise ValueError(f"vision checkpoint {path} does not match the spec: " + "; ".join(mismatched))
    return model


def build_vision_tower(
    kind: TowerKind,
    *,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    select_layer: int = -2,
    select_feature: SelectFeature = "patch",
    post_norm: bool = False,
    hidden_act: str | None = None,
    layer_norm_eps: float | None = None,
    use_head: bool = True,
    pretrained: str | None = None,
    frozen: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VisionTower:
    """Build a tower from numbers, or load it from a local safetensors checkpoint.

    ``hidden_act`` and ``layer_norm_eps`` default to the family's own (``quick_gelu`` and 1e-5
    for CLIP, ``gelu_pytorch_tanh`` and 1e-6 for SigLIP). ``use_head`` builds SigLIP's
    attention-pooling head, which is never called (DeepSeek-VL2 counts its ~15.2M parameters). On ``device="meta"`` nothing is allocated and
    ``pretrained`` is not read.
    """
    if kind not in _TOWERS:
        raise ValueError(f"vision tower kind must be one of {sorted(_TOWERS)}, got {kind!r}")
    numbers = dict(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
    )
    if hidden_act is not None:
        numbers["hidden_act"] = hidden_act
    if layer_norm_eps is not None:
        numbers["layer_norm_eps"] = layer_norm_eps
    config = _vision_config(kind, use_head, **numbers)
    # device=None builds on the caller's default device (e.g. inside `with torch.device("meta")`).
    target = torch.device(device) if device is not None else torch.get_default_device()
    if pretrained is not None and target.type != "meta":
        model = _load_pretrained(kind, pretrained, config, dtype).to(target)
    else:
        with torch.device(target):
            model = _TOWERS[kind][1](config)
        if dtype is not None:
            model = model.to(dtype)
    tower = VisionTower(model, select_layer=select_layer, select_feature=select_feature, post_norm=post_norm)
    if frozen:
        tower.requires_grad_(False)
        tower.eval()
    return tower
