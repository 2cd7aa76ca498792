"""The vision encoder section: which transformers tower, its size, and which features it hands on."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from moebuild.schemas.base import (
    Activation,
    FFNWidth,
    HeadCount,
    ImageSide,
    LayerCount,
    SmallCount,
    SpecModel,
    Width,
)


class DynamicTilingSpec(SpecModel):
    """DeepSeek-VL2 dynamic tiling: a global view plus local tiles on the best-fitting grid.

    The model lays each picture out as DeepSeek-VL2 does: the global view's token rows, each
    followed by a learned image_newline, a learned view_separator, then the local tiles stitched
    into one grid whose rows also end in the newline (both vectors are the connector's parameters).
    """

    type: Literal["dynamic"]
    """Selects this kind: dynamic."""
    tile_size: ImageSide = 384
    """Side of one square tile in pixels (the tower's image_size)."""
    max_tiles: SmallCount = 9
    """Largest number of local tiles m*n a grid may have."""
    global_view: bool = True
    """Prepend a downscaled view of the whole image to the local tiles."""
    max_images: SmallCount = 2
    """Prompts with more images than this get the global view plus a single tile per image."""


class _VisionBase(SpecModel):
    pretrained: str | None = None
    """Local directory of a Hugging Face checkpoint (safetensors); null = random init from the numbers."""
    image_size: ImageSide
    """Input resolution in pixels (square)."""
    patch_size: ImageSide
    """Side of one patch in pixels; the grid is image_size // patch_size (384 / 14 -> 27, as SigLIP-SO400M)."""
    hidden_size: Width
    """Width of the tower."""
    num_layers: LayerCount
    """Number of transformer blocks."""
    num_heads: HeadCount
    """Attention heads per block."""
    intermediate_size: FFNWidth
    """Width of each block's MLP."""
    select_layer: int = -2
    """Which hidden state feeds the connector (Python indexing over the num_layers+1 hidden states)."""
    post_norm: bool = False
    """Apply the tower's final LayerNorm to the selected features (DeepSeek-VL2 uses the last block + norm)."""
    frozen: bool = True
    """Keep the tower's weights out of training."""
    layer_norm_eps: float = 1e-5
    """Epsilon of the tower's LayerNorms."""
    tiling: DynamicTilingSpec | None = None
    """Image tiling; null = one resized image per picture."""

    @model_validator(mode="after")
    def _shape_rules(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.tiling is not None and self.tiling.tile_size != self.image_size:
            raise ValueError(f"tiling.tile_size {self.tiling.tile_size} must equal image_size {self.image_size} "
                             "(each tile is one tower input)")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(
                f"select_layer {self.select_layer} is out of range for {self.num_layers} layers "
                f"(expected {-(self.num_layers + 1)}..{self.num_layers})"
            )
        return self


class ClipVisionSpec(_VisionBase):
    """A CLIP ViT (transformers CLIPVisionModel): a CLS token plus one token per patch."""

    type: Literal["clip"]
    """Selects this kind: clip."""
    select_feature: Literal["patch", "cls_patch"] = "patch"
    """patch = drop the CLS token (LLaVA); cls_patch = keep it."""
    hidden_act: Activation = "quick_gelu"
    """Activation of the tower's MLPs (OpenAI CLIP uses quick_gelu)."""

    @model_validator(mode="after")
    def _tiling_needs_a_grid(self):
        if self.tiling is not None and self.select_feature == "cls_patch":
            raise ValueError("tiling lays patch tokens out on their grid; use select_feature: patch (no CLS)")
        return self


class SiglipVisionSpec(_VisionBase):
    """A SigLIP ViT (transformers SiglipVisionModel): patch tokens only, no CLS."""

    type: Literal["siglip"]
    """Selects this kind: siglip."""
    select_feature: Literal["patch"] = "patch"
    """SigLIP has no CLS token, so features are always the patch tokens."""
    hidden_act: Activation = "gelu_pytorch_tanh"
    """Activation of the tower's MLPs."""
    use_head: bool = True
    """Build the attention-pooling head (never called; DeepSeek-VL2 counts its parameters)."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the tower's LayerNorms."""


VisionSpec = Annotated[Union[ClipVisionSpec, SiglipVisionSpec], Field(discriminator="type")]
