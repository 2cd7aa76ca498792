"""Image processors against transformers' CLIP / SigLIP processors and DeepSeek-VL2's tiling rules."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import (
    SiglipImageProcessorPil,
)

from moebuild.model.processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TiledImageProcessor,
    build_image_processor,
    candidate_grids,
    select_grid,
)


def _picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf(processor, image):
    return torch.as_tensor(processor(images=image, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (28, 28)])
def test_clip_without_padding_matches_clip_image_processor(size):
    image = _picture(*size)
    ours = build_image_processor("clip", image_size=28, tokens_per_image=4, pad_to_square=False)([image])
    hf = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    torch.testing.assert_close(ours.pixel_values, _hf(hf, image), atol=1e-6, rtol=0)
    assert ours.num_image_tokens == [4]


def test_siglip_matches_siglip_image_processor():
    images = [_picture(50, 37, seed=1), _picture(20, 61, seed=2)]
    ours = build_image_processor("siglip", image_size=28, tokens_per_image=4)(images)
    hf = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    torch.testing.assert_close(ours.pixel_values, _hf(hf, images), atol=1e-6, rtol=0)
    assert ours.pixel_values.shape == (2, 3, 28, 28) and ours.num_image_tokens == [4, 4]


def test_clip_pads_to_square_with_mean_colour():
    # A 40 x 20 black picture on a 40 x 40 canvas: rows 0-9 and 30-39 are the mean colour.
    processor = build_image_processor("clip", image_size=40, tokens_per_image=4)
    out = processor(np.zeros((20, 40, 3), dtype=np.uint8)).pixel_values[0]
    colour = torch.tensor([122, 116, 104]) / 255  # int(mean * 255), as LLaVA's expand2square
    pad = (colour - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    black = -torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD)
    for rows, value in [(slice(0, 10), pad), (slice(30, 40), pad), (slice(10, 30), black)]:
        torch.testing.assert_close(out[:, rows], value[:, None, None].expand(3, out[:, rows].shape[1], 40))


def test_padded_clip_equals_clip_processor_on_the_padded_picture():
    image = _picture(50, 30)
    canvas = Image.new("RGB", (50, 50), (122, 116, 104))
    canvas.paste(image, (0, 10))
    ours = build_image_processor("clip", image_size=28, tokens_per_image=4)(image)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    torch.testing.assert_close(ours.pixel_values, _hf(hf, canvas), atol=1e-6, rtol=0)


def test_arrays_and_grey_pictures():
    processor = build_image_processor("siglip", image_size=28, tokens_per_image=4)
    rgb = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    torch.testing.assert_close(processor(rgb).pixel_values, processor(Image.fromarray(rgb)).pixel_values)
    grey = processor(np.full((30, 40), 255, dtype=np.uint8)).pixel_values
    torch.testing.assert_close(grey, torch.ones_like(grey))
    with pytest.raises(ValueError, match="uint8"):
        processor(rgb.astype(np.float32))


def test_candidate_grids_are_deepseek_vl2_resolutions_in_order():
    published = [  # DeepSeek-VL2 config.json candidate_resolutions, [width, height]
        [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
        [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
        [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
        [3456, 384], [1152, 1152],
    ]
    assert [[c * 384, r * 384] for c, r in candidate_grids(9)] == published


@pytest.mark.parametrize(
    "size, grid", [((300, 200), (1, 1)), ((768, 768), (2, 2)), ((1152, 1152), (3, 3)), ((768, 384), (2, 1)),
                   ((384, 1100), (1, 3)), ((4000, 100), (9, 1))],
)
def test_select_grid(size, grid):
    assert select_grid(size, candidate_grids(9), 384) == grid


@pytest.mark.parametrize("side, grid, tokens", [(20, (1, 1), 421), (56, (2, 2), 1023), (84, (3, 3), 2017)])
def test_tiled_token_counts(side, grid, tokens):
    # Tile 28 px stands in for 384: the token count depends only on the grid and 14 tokens per tile side.
    processor = TiledImageProcessor(28, tile_token_side=14)
    out = processor([_picture(side, side)])
    assert out.tile_grids == [grid] and out.num_image_tokens == [tokens]
    assert out.pixel_values.shape == (1 + grid[0] * grid[1], 3, 28, 28)


def test_tiled_views_values():
    # Left half red, right half blue, 56 x 28: a 2 x 1 grid whose two tiles are pure colours; the
    # global view is the picture shrunk to 28 x 14 and centred on grey 127 rows.
    array = np.zeros((28, 56, 3), dtype=np.uint8)
    array[:, :28, 0] = 255
    array[:, 28:, 2] = 255
    out = TiledImageProcessor(28, tile_token_side=2)(array)
    assert out.tile_grids == [(2, 1)] and out.num_image_tokens == [2 * 3 + 1 + 2 * 5]
    red, blue = torch.tensor([1.0, -1, -1]), torch.tensor([-1.0, -1, 1])
    global_view, left, right = out.pixel_values
    torch.testing.assert_close(left, red[:, None, None].expand(3, 28, 28))
    torch.testing.assert_close(right, blue[:, None, None].expand(3, 28, 28))
    grey = (127 / 255 - 0.5) / 0.5
    torch.testing.assert_close(global_view[:, :7], torch.full((3, 7, 28), grey))
    torch.testing.assert_close(global_view[:, 21:], torch.full((3, 7, 28), grey))
    torch.testing.assert_close(global_view[:, 12, 2], red)
    torch.testing.assert_close(global_view[:, 12, 25], blue)


def test_many_images_get_a_single_tile_each():
    processor = TiledImageProcessor(28, tile_token_side=14, max_images=2)
    out = processor([_picture(84, 84, seed=s) for s in range(3)])
    assert out.tile_grids == [(1, 1)] * 3 and out.num_image_tokens == [421] * 3
    assert out.pixel_values.shape == (6, 3, 28, 28)


def test_tiling_without_global_view():
    out = TiledImageProcessor(28, tile_token_side=14, global_view=False)([_picture(56, 56)])
    assert out.num_image_tokens == [28 * 29] and out.pixel_values.shape == (4, 3, 28, 28)
