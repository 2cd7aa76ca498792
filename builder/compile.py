"""Spec -> modules: one small build function per spec node type, found through a plain dict.

`BUILDERS` maps each schema class to its build function; `build_module(node, **context)` looks a
node up there, so any single node (one MoE layer for a given hidden size, a connector, a
router) can be built alone for tests and benchmarks. Modules take plain typed arguments; only
the functions here read spec objects.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from moebuild.errors import BuildError
from moebuild.schemas import (
    ClipVision,
    DownsampleMLPConnector,
    LanguageSpec,
    LinearConnector,
    MLPConnector,
    ModelSpec,
    MoESpec,
    SiglipVision,
    moe_layer_indices,
)

from .connectors import DownsampleMLPConnector as DownsampleMLP
from .connectors import LinearConnector as Linear
from .connectors import MLPConnector as MLP
from .language import LanguageModel, make_hf_config
from .moe.build import DTYPES, MOE_BUILDERS, build_moe
from .moe.experts import ExpertPool
from .moe.routing import Router, init_router
from .tiling import TiledConnector
from .vision import VisionTower, build_vision_tower


def build_vision(node: ClipVision | SiglipVision) -> VisionTower:
    """The tower with random weights; a `pretrained` checkpoint is loaded by `moebuild.build`."""
    extra = {"use_head": node.use_head} if isinstance(node, SiglipVision) else {}
    return build_vision_tower(
        node.type,
        image_size=node.image_size,
        patch_size=node.patch_size,
        hidden_size=node.hidden_size,
        num_layers=node.num_layers,
        num_heads=node.num_heads,
        intermediate_size=node.intermediate_size,
        select_layer=node.select_layer,
        select_feature=node.select_feature,
        post_norm=node.post_norm,
        hidden_act=node.hidden_act,
        layer_norm_eps=node.layer_norm_eps,
        frozen=node.frozen,
        **extra,
    )


def build_linear_connector(node: LinearConnector, *, in_dim: int, out_dim: int) -> nn.Module:
    return Linear(in_dim, out_dim)


def build_mlp_connector(node: MLPConnector, *, in_dim: int, out_dim: int) -> nn.Module:
    return MLP(in_dim, out_dim, depth=node.depth, activation=node.activation)


def build_downsample_connector(node: DownsampleMLPConnector, *, in_dim: int, out_dim: int) -> nn.Module:
    return DownsampleMLP(in_dim, out_dim, factor=node.factor, depth=node.depth, activation=node.activation)


def language_hf_config(node: LanguageSpec):
    """The transformers config of the language family, from the spec's numbers."""
    extras = {} if node.hidden_act is None else {"hidden_act": node.hidden_act}
    return make_hf_config(
        node.type,
        hidden_size=node.hidden_size,
        num_layers=node.num_layers,
        num_heads=node.num_heads,
        num_kv_heads=node.num_kv_heads,
        intermediate_size=node.intermediate_size,
        vocab_size=node.vocab_size,
        head_dim=node.head_dim,
        attention=node.attention.model_dump(),
        rope_theta=node.rope_theta,
        partial_rotary_factor=node.partial_rotary_factor,
        max_position_embeddings=node.max_position_embeddings,
        norm_eps=node.norm_eps,
        qkv_bias=node.qkv_bias,
        tie_word_embeddings=node.tie_word_embeddings,
        **extras,
    )


def build_language(node: LanguageSpec, *, moe: MoESpec | None = None, hf_config=None) -> LanguageModel:
    """The decoder, with an MoE layer in place of the FFN of every layer `moe.layers` names."""
    hf_config = hf_config or language_hf_config(node)
    moe_layers = set() if moe is None else set(moe_layer_indices(moe.layers, node.num_layers))
    return LanguageModel(
        hf_config,
        node.type,
        lambda i: build_moe(moe, hidden_size=node.hidden_size) if i in moe_layers else None,
    )


BUILDERS: dict[type, Callable[..., nn.Module]] = {
    ClipVision: build_vision,
    SiglipVision: build_vision,
    LinearConnector: build_linear_connector,
    MLPConnector: build_mlp_connector,
    DownsampleMLPConnector: build_downsample_connector,
    LanguageSpec: build_language,
    **MOE_BUILDERS,
}


def build_module(node, **context) -> nn.Module:
    """Build one spec node; a plain dict is read as the `moe` section.

    >>> layer = build_module({"pools": {...}, "routes": [...]}, hidden_size=64)
    """
    if isinstance(node, dict):
        node = MoESpec.model_validate(node)
    try:
        builder = BUILDERS[type(node)]
    except KeyError:
        raise TypeError(f"no build function for {type(node).__name__}; known: {', '.join(c.__name__ for c in BUILDERS)}") from None
    return builder(node, **context)


def build_components(spec: ModelSpec, text_config=None) -> tuple[VisionTower, nn.Module, LanguageModel]:
    """Vision tower, connector and language model of a spec (random init, current default device)."""
    vision = build_module(spec.vision)
    connector = build_module(spec.connector, in_dim=vision.hidden_size, out_dim=spec.language.hidden_size)
    if spec.vision.tiling is not None:
        # DeepSeek-VL2 keeps image_newline / view_separator beside its projector: they are the connector's.
        connector = TiledConnector(connector, spec.language.hidden_size, global_view=spec.vision.tiling.global_view)
    language = build_language(spec.language, moe=spec.moe, hf_config=text_config)
    return vision, connector, language


def init_custom_weights(module: nn.Module, std: float) -> bool:
    """Initialise the modules transformers' `_init_weights` does not know; True when handled.

    transformers' `initialization` functions skip tensors already loaded by from_pretrained.
    """
    from transformers import initialization as init

    if isinstance(module, ExpertPool):
        for name, param in module.named_parameters(recurse=False):
            init.zeros_(param) if name.endswith("_bias") else init.normal_(param, std=std)
            if getattr(module, "upcycle", False):
                # Upcycling (Komatsuzaki et al. 2023; MoE-LLaVA): every expert a copy of one FFN.
                init.copy_(param, param[:1].expand_as(param).clone())
        return True
    if isinstance(module, Router):
        init_router(module, init.normal_, init.zeros_)
        return True
    return False


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None):
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(spec, device=None, dtype=None, seed: int | None = None):
    """A `MoEVLMForConditionalGeneration` from a spec, a preset name or a spec file.

    On `device="meta"` nothing is allocated (and no pretrained weights are read); `dtype` is the
    parameter dtype (routers still compute in their spec'd precision).
    """
    from .loading import load_spec
    from .model import MoEVLMConfig, MoEVLMForConditionalGeneration
    from .pretrained import load_pretrained_parts

    if not isinstance(spec, ModelSpec):
        spec = load_spec(spec)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if seed is not None:
        torch.manual_seed(seed)
    config = MoEVLMConfig(spec=spec.model_dump(mode="json"))
    device = torch.device(device or "cpu")
    if device.type != "meta":
        check_memory(spec, dtype or torch.float32, device)
    with torch.device(device), default_dtype(dtype):
        model = MoEVLMForConditionalGeneration(config)
    if device.type != "meta":
        load_pretrained_parts(model, spec)
    return model


def check_memory(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating, a model whose weights alone exceed the memory available."""
    from .memory_budget import available_bytes
    from .summary import summarize

    needed = summarize(spec).total_params * dtype.itemsize
    available = available_bytes(device)
    if available is not None and needed > available:
        raise BuildError(
            f"{spec.name} needs {needed / 2**30:.1f} GiB for its weights in {str(dtype).removeprefix('torch.')} "
            f"but {available / 2**30:.1f} GiB of {device.type} memory is available; build it on "
            "device='meta' (moebuild compile --device meta) to inspect it without allocating"
        )


def tile_token_side(spec: ModelSpec) -> int:
    """Tokens along one side of a view after the connector (27 patches, 2x2 merge -> 14)."""
    factor = spec.connector.factor if isinstance(spec.connector, DownsampleMLPConnector) else 1
    return math.ceil(spec.vision.image_size // spec.vision.patch_size / factor)


def build_processor(spec):
    """The image processor matching a spec's tower, connector and tiling."""
    from .processing import TOWER_NORMALIZATION, TiledImageProcessor, build_image_processor

    if not isinstance(spec, ModelSpec):
        from .loading import load_spec

        spec = load_spec(spec)
    vision = spec.vision
    token_side = tile_token_side(spec)
    if vision.tiling is not None:
        mean, std = TOWER_NORMALIZATION[vision.type]
        tiling = vision.tiling
        return TiledImageProcessor(
            tiling.tile_size,
            tile_token_side=token_side,
            max_tiles=tiling.max_tiles,
            max_images=tiling.max_images,
            global_view=tiling.global_view,
            image_mean=mean,
            image_std=std,
        )
    tokens = token_side**2 + (vision.select_feature == "cls_patch")
    return build_image_processor(vision.type, image_size=vision.image_size, tokens_per_image=tokens)


def build_and_save(spec: ModelSpec, output, *, device="cpu", dtype=None, seed=None, force: bool = False) -> None:
    """Build and save to `output` (see moebuild.output: staged, renamed at the end, and never
    deleting what moebuild did not write; `force` replaces a model moebuild wrote there)."""
    from pathlib import Path

    from .output import write_model_dir

    def write(directory: Path) -> None:
        model = build(spec, device=device, dtype=dtype, seed=seed)
        if device == "meta":
            model.config.save_pretrained(directory)
            model.write_spec(directory)
        else:
            model.save_pretrained(directory)

    write_model_dir(Path(output), write, force=force)
