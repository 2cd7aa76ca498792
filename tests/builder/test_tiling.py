"""DeepSeek-VL2's tiled token layout: the connector's arrangement against a written-out loop, and the
processor's token counts against what the model inserts (421 / 1023 / 2017 for 1x1 / 2x2 / 3x3
grids with a DeepSeek-VL2-shaped tower and connector; 576 for MoE-LLaVA)."""

import numpy as np
import pytest
import torch
from torch import nn

from moebuild import build, build_processor
from moebuild.model.tiling import TiledConnector, tiled_token_count
from moebuild.spec.loading import load_spec

H = 8


def _layout_loop(views_VPH, grid, side, newline, separator):
    """DeepSeek-VL2's layout one token at a time: global rows + newlines, separator, local rows + newlines."""
    cols, rows = grid
    out = []
    if separator is not None:
        for y in range(side):
            out += [views_VPH[0, y * side + x] for x in range(side)] + [newline]
        out.append(separator)
        views_VPH = views_VPH[1:]
    for y in range(rows * side):
        for x in range(cols * side):
            tile = (y // side) * cols + x // side
            out.append(views_VPH[tile, (y % side) * side + x % side])
        out.append(newline)
    return torch.stack(out)


@pytest.mark.parametrize("global_view", [True, False])
@pytest.mark.parametrize("grid", [(1, 1), (3, 2), (1, 4)])
def test_arrangement_equals_the_token_loop(grid, global_view):
    torch.manual_seed(0)
    side = 3
    layout = TiledConnector(nn.Identity(), H, global_view=global_view)
    views_VPH = torch.randn(grid[0] * grid[1] + global_view, side * side, H)
    tokens_TH = layout.arrange(views_VPH, [grid])
    expected = _layout_loop(views_VPH, grid, side, layout.image_newline, layout.view_separator)
    torch.testing.assert_close(tokens_TH, expected, rtol=0, atol=0)
    assert tokens_TH.shape[0] == tiled_token_count(side, grid, global_view)


def test_several_pictures_are_laid_out_in_order():
    torch.manual_seed(0)
    layout = TiledConnector(nn.Identity(), H)
    grids = [(2, 1), (1, 1)]
    views_VPH = torch.randn(3 + 2, 4, H)
    tokens_TH = layout.arrange(views_VPH, grids)
    first = layout.arrange_one(views_VPH[:3], grids[0])
    torch.testing.assert_close(tokens_TH, torch.cat([first, layout.arrange_one(views_VPH[3:], grids[1])]))
    with pytest.raises(ValueError, match="need 5 views .* pixel_values holds 4"):
        layout.arrange(views_VPH[:4], grids)


def test_published_token_counts():
    assert [tiled_token_count(14, (n, n)) for n in (1, 2, 3)] == [421, 1023, 2017]


@pytest.fixture(scope="module")
def deepseek_shaped():
    """micro-deepseek-vl2 with SigLIP-SO400M/384's grid: 27 x 27 patches -> 14 x 14 tokens per view."""
    spec = load_spec("micro-deepseek-vl2", overrides=["vision.image_size=384", "vision.tiling.tile_size=384",
                                                      "vision.hidden_size=32", "vision.num_heads=2"])
    torch.manual_seed(0)
    return build(spec).eval(), build_processor(spec)


def _picture(width, height, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("side,tokens", [(384, 421), (768, 1023), (1152, 2017)])
def test_processor_count_equals_what_the_model_inserts(deepseek_shaped, side, tokens):
    model, processor = deepseek_shaped
    images = processor([_picture(side, side)])
    assert images.tile_grids == [(side // 384, side // 384)]
    assert images.num_image_tokens == [tokens]
    ids = torch.tensor([[1] + [model.config.image_token_id] * tokens + [5, 6]])
    with torch.no_grad():
        embeds = model.merge_image_features(ids, model.get_input_embeddings()(ids), images.pixel_values,
                                            images.tile_grids)
        arranged = model.connector.arrange(model.image_features(images.pixel_values), images.tile_grids)
    torch.testing.assert_close(embeds[0, 1:-2], arranged)
    # the newline closes the first row of the global view; the separator follows the global view
    torch.testing.assert_close(embeds[0, 1 + 14], model.connector.image_newline.detach())
    torch.testing.assert_close(embeds[0, 1 + 14 * 15], model.connector.view_separator.detach())


def test_three_pictures_get_one_tile_each_and_a_forward_runs(deepseek_shaped):
    model, processor = deepseek_shaped
    images = processor([_picture(900, 300, seed=i) for i in range(3)])
    assert images.tile_grids == [(1, 1)] * 3 and images.num_image_tokens == [421] * 3
    ids = torch.tensor([[1] + [model.config.image_token_id] * 1263 + [7]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=images.pixel_values, image_grids=images.tile_grids)
    assert out.logits.shape[1] == ids.shape[1] and torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="1263 image tokens but 2 image"):
        model(input_ids=ids, pixel_values=images.pixel_values[:4], image_grids=images.tile_grids[:2])


def test_grids_without_tiling_are_refused():
    model = build("micro-moe-llava")
    ids = torch.tensor([[1] + [model.config.image_token_id] * model.num_image_tokens])
    with pytest.raises(ValueError, match="no vision.tiling"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 56, 56), image_grids=[(1, 1)])


def test_moe_llava_image_takes_576_tokens():
    spec = load_spec("micro-moe-llava", overrides=["vision.image_size=336"])
    torch.manual_seed(0)
    model = build(spec).eval()
    images = build_processor(spec)([_picture(500, 375)])
    assert images.num_image_tokens == [576] and images.tile_grids is None
    with torch.no_grad():
        assert model.image_embeddings(images.pixel_values).shape == (576, spec.language.hidden_size)


def test_beam_expansion_repeats_each_samples_pictures_together(deepseek_shaped):
    """num_beams / num_return_sequences repeat samples; each sample's views and grids must follow
    as a group (transformers' row-wise repeat would interleave the global views and the tiles)."""
    model, processor = deepseek_shaped
    images = processor([_picture(384, 384, seed=1), _picture(384, 384, seed=2)])  # 2 views, 421 tokens each
    ids = torch.tensor([[1] + [model.config.image_token_id] * 421 + [7]] * 2)
    kwargs = {"pixel_values": images.pixel_values, "image_grids": images.tile_grids, "attention_mask": torch.ones_like(ids)}
    expanded_ids, expanded = model._expand_inputs_for_generation(2, False, ids, **kwargs)
    assert expanded["image_grids"] == [(1, 1)] * 4 and expanded["pixel_values"].shape[0] == 8
    with torch.no_grad():
        want = model(input_ids=ids, **kwargs).logits
        got = model(input_ids=expanded_ids, **expanded).logits
    torch.testing.assert_close(got, want.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-5)


def test_beam_expansion_of_untiled_pictures_and_samples_without_any():
    spec = load_spec("micro-moe-llava")
    torch.manual_seed(0)
    model = build(spec).eval()
    n = model.num_image_tokens
    image = model.config.image_token_id
    ids = torch.tensor([[1] + [image] * 2 * n + [7], [1] + [5] * 2 * n + [7], [1] + [image] * n + [8] * n + [7]])
    pixel_values = torch.randn(3, 3, spec.vision.image_size, spec.vision.image_size)  # two pictures, none, one
    expanded_ids, expanded = model._expand_inputs_for_generation(3, False, ids, pixel_values=pixel_values)
    assert torch.equal(expanded["pixel_values"], pixel_values[[0, 1, 0, 1, 0, 1, 2, 2, 2]])
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=pixel_values).logits
        got = model(input_ids=expanded_ids, pixel_values=expanded["pixel_values"]).logits
    torch.testing.assert_close(got, want.repeat_interleave(3, dim=0), rtol=1e-5, atol=1e-5)


def test_beam_expansion_refuses_pictures_no_sample_uses_and_grids_without_tiling():
    torch.manual_seed(0)
    model = build("micro-moe-llava").eval()
    n, image = model.num_image_tokens, model.config.image_token_id
    ids = torch.tensor([[1] + [image] * n + [7]])
    size = model.spec.vision.image_size
    with pytest.raises(ValueError, match="image tokens for 1 image\\(s\\) but 2 were given"):
        model._expand_inputs_for_generation(2, False, ids, pixel_values=torch.zeros(2, 3, size, size))
    with pytest.raises(ValueError, match="no vision.tiling"):
        model._expand_inputs_for_generation(2, False, ids, pixel_values=torch.zeros(1, 3, size, size),
                                            image_grids=[(1, 1)])
