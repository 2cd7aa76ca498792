"""Image preprocessing: pictures -> normalised pixel tensors, and how many image tokens each becomes.

- ``ImageProcessor`` follows LLaVA-1.5 as MoE-LLaVA runs it (``image_aspect_ratio: pad``): pad the
  picture to a square with the mean colour (LLaVA's ``expand2square``), then transformers'
  ``CLIPImageProcessor`` (shortest edge -> image_size, bicubic; centre crop) or
  ``SiglipImageProcessor`` (bicubic resize to image_size x image_size); rescale by 1/255,
  normalise with the tower's mean / std.
- ``TiledImageProcessor`` follows DeepSeek-VL2 (deepseek_vl2/models/processing_deepseek_vl_v2.py,
  ``tokenize_with_images`` and ``select_best_resolution``): a global view (the picture padded to
  one tile with the mean colour, grey 127) plus local tiles cut from the picture padded to the
  best-fitting grid of tiles. Token count per picture, with ``s`` tokens per tile side after the
  connector: global ``s * (s + 1)`` (a newline after each row), one view separator, local
  ``(rows * s) * (cols * s + 1)``: 421 / 1023 / 2017 for 1x1 / 2x2 / 3x3 grids with s = 14.

Both take PIL images or uint8 arrays (H x W x 3, or H x W grey); one call is one prompt's images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from moebuild.model.tiling import tiled_token_count

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
TOWER_NORMALIZATION = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "siglip": (HALF, HALF)}


@dataclass
class ProcessedImages:
    pixel_values: torch.Tensor
    """[V, 3, H, W] float32, every view of every image in order."""
    num_image_tokens: list[int]
    """Image tokens each input picture takes in the sequence."""
    tile_grids: list[tuple[int, int]] | None = None
    """(columns, rows) of local tiles per picture; None when not tiling."""


def to_rgb(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"images must be PIL images or uint8 H x W [x C] arrays, got {array.dtype} {array.shape}")
    return Image.fromarray(array).convert("RGB")


def mean_colour(mean: Sequence[float]) -> tuple[int, ...]:
    # int() truncates, as both LLaVA and DeepSeek-VL2 do: CLIP -> (122, 116, 104), 0.5 -> 127.
    return tuple(int(m * 255) for m in mean)


def expand_to_square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: centre the picture on a square canvas of its longer side."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB picture -> [3, H, W] float32 ``(x / 255 - mean) / std``."""
    x_HWC = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0).float()
    x_CHW = x_HWC.permute(2, 0, 1)
    mean_C11 = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_C11 = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x_CHW - mean_C11) / std_C11


def resize_shortest_edge_and_crop(image: Image.Image, size: int) -> Image.Image:
    """transformers' CLIPImageProcessor: shortest edge -> size (bicubic), then a centre crop."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageProcessor:
    """One view per picture, resized to the tower's input size."""

    def __init__(
        self,
        image_size: int,
        *,
        tokens_per_image: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        resize: Literal["shortest_edge_crop", "square"],
        pad_to_square: bool,
    ):
        self.image_size = image_size
        self.tokens_per_image = tokens_per_image
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.resize = resize
        self.pad_to_square = pad_to_square

    def preprocess(self, image) -> torch.Tensor:
        image = to_rgb(image)
        if self.pad_to_square:
            image = expand_to_square(image, mean_colour(self.image_mean))
        if self.resize == "shortest_edge_crop":
            image = resize_shortest_edge_and_crop(image, self.image_size)
        else:
            image = image.resize((self.image_size, self.image_size), resample=Image.Resampling.BICUBIC)
        return normalize(image, self.image_mean, self.image_std)

    def __call__(self, images) -> ProcessedImages:
        images = images if isinstance(images, (list, tuple)) else [images]
        pixel_values = torch.stack([self.preprocess(image) for image in images])
        return ProcessedImages(pixel_values, [self.tokens_per_image] * len(images))


def build_image_processor(
    kind: Literal["clip", "siglip"], *, image_size: int, tokens_per_image: int, pad_to_square: bool | None = None
) -> ImageProcessor:
    """The processor a tower expects: CLIP crops (and pads to square by default, as LLaVA's
    ``image_aspect_ratio: pad``); SigLIP resizes to a square. Both normalise with the tower's stats."""
    if kind not in TOWER_NORMALIZATION:
        raise ValueError(f"image processor kind must be one of {sorted(TOWER_NORMALIZATION)}, got {kind!r}")
    mean, std = TOWER_NORMALIZATION[kind]
    return ImageProcessor(
        image_size,
        tokens_per_image=tokens_per_image,
        image_mean=mean,
        image_std=std,
        resize="shortest_edge_crop" if kind == "clip" else "square",
        pad_to_square=kind == "clip" if pad_to_square is None else pad_to_square,
    )


def candidate_grids(max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) with columns * rows <= max_tiles, in DeepSeek-VL2's ``candidate_resolutions``
    order (by tile count, then thinner first, then wide before tall), which decides ties."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1)]
    return sorted(grids, key=lambda g: (g[0] * g[1], min(g), g[0] > g[1]))


def select_grid(image_size: tuple[int, int], grids: Sequence[tuple[int, int]], tile: int) -> tuple[int, int]:
    """DeepSeek-VL2's ``select_best_resolution``: most effective pixels, then least waste."""
    width, height = image_size
    best, best_effective, best_wasted = grids[0], 0, float("inf")
    for cols, rows in grids:
        canvas_w, canvas_h = cols * tile, rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cols, rows), effective, wasted
    return best


class TiledImageProcessor:
    """DeepSeek-VL2 dynamic tiling: a global view, then local tiles in row-major order."""

    def __init__(
        self,
        tile_size: int,
        *,
        tile_token_side: int,
        max_tiles: int = 9,
        max_images: int = 2,
        global_view: bool = True,
        image_mean: Sequence[float] = HALF,
        image_std: Sequence[float] = HALF,
    ):
        self.tile_size = tile_size
        self.tile_token_side = tile_token_side
        self.grids = candidate_grids(max_tiles)
        self.max_images = max_images
        self.global_view = global_view
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return tiled_token_count(self.tile_token_side, grid, self.global_view)

    def views(self, image: Image.Image, grid: tuple[int, int]) -> list[torch.Tensor]:
        tile = self.tile_size
        colour = mean_colour(self.image_mean)
        views = [ImageOps.pad(image, (tile, tile), color=colour)] if self.global_view else []
        cols, rows = grid
        local = ImageOps.pad(image, (cols * tile, rows * tile), color=colour)
        views += [
            local.crop((x, y, x + tile, y + tile))
            for y in range(0, rows * tile, tile)
            for x in range(0, cols * tile, tile)
        ]
        return [normalize(view, self.image_mean, self.image_std) for view in views]

    def __call__(self, images) -> ProcessedImages:
        images = [to_rgb(im) for im in (images if isinstance(images, (list, tuple)) else [images])]
        # DeepSeek-VL2 tiles only when the prompt has few images; others get a single tile.
        tiling = len(images) <= self.max_images
        grids = [select_grid(im.size, self.grids, self.tile_size) if tiling else (1, 1) for im in images]
        pixel_values = torch.stack([view for im, grid in zip(images, grids) for view in self.views(im, grid)])
        return ProcessedImages(pixel_values, [self.num_tokens(g) for g in grids], grids)
