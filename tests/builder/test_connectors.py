"""Connectors against written-out computations, including DeepSeek-VL2's channel-major merge order."""

import pytest
import torch
import torch.nn.functional as F

from moebuild.model.connectors import (
    CONNECTORS,
    DownsampleMLPConnector,
    LinearConnector,
    MLPConnector,
    merge_patches,
)


def test_mlp_connector_is_linear_gelu_linear():
    torch.manual_seed(0)
    conn = MLPConnector(6, 8, depth=2, activation="gelu")
    x = torch.randn(2, 5, 6)
    w0, b0 = conn.state_dict()["layers.0.weight"], conn.state_dict()["layers.0.bias"]
    w2, b2 = conn.state_dict()["layers.2.weight"], conn.state_dict()["layers.2.bias"]
    h = x @ w0.T + b0
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU, as nn.GELU()
    torch.testing.assert_close(conn(x), h @ w2.T + b2)
    assert sorted(conn.state_dict()) == ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight"]
    assert conn.num_output_tokens(5) == 5


def test_llava_projector_keys_load_by_prefix_rename():
    conn = MLPConnector(6, 8)
    llava = {f"mm_projector.{k.removeprefix('layers.')}": torch.randn_like(v) for k, v in conn.state_dict().items()}
    conn.load_state_dict({f"layers.{k.removeprefix('mm_projector.')}": v for k, v in llava.items()}, strict=True)
    assert torch.equal(conn.layers[2].weight, llava["mm_projector.2.weight"])


def test_linear_connector():
    conn = LinearConnector(6, 8)
    x = torch.randn(3, 6)
    torch.testing.assert_close(conn(x), x @ conn.layers[0].weight.T + conn.layers[0].bias)
    assert len(conn.layers) == 1


def _merge_loop(x_NPC, factor):
    """Literal DeepSeek-VL2 order: pad grid with zeros, then for each block, channel-major features."""
    n, p, c = x_NPC.shape
    side = int(p**0.5)
    padded = -(-side // factor) * factor
    grid = torch.zeros(n, padded, padded, c)
    grid[:, :side, :side] = x_NPC.reshape(n, side, side, c)
    out = torch.zeros(n, (padded // factor) ** 2, c * factor * factor)
    for b in range(n):
        for bi in range(padded // factor):
            for bj in range(padded // factor):
                feats = [
                    grid[b, bi * factor + ki, bj * factor + kj, ch]
                    for ch in range(c)
                    for ki in range(factor)
                    for kj in range(factor)
                ]
                out[b, bi * (padded // factor) + bj] = torch.stack(feats)
    return out


def test_merge_order_on_3x3_grid_with_two_channels():
    # token t has channel 0 = t + 1 and channel 1 = -(t + 1): every value is identifiable.
    t = torch.arange(1.0, 10.0)
    x = torch.stack([t, -t], dim=-1)[None]  # [1, 9, 2]
    merged = merge_patches(x, 2)
    assert merged.shape == (1, 4, 8)
    # Block (0,0) holds tokens 1,2 (row 0) and 4,5 (row 1); channel 0's four first, then channel 1's.
    assert merged[0, 0].tolist() == [1, 2, 4, 5, -1, -2, -4, -5]
    # Block (0,1): tokens 3 and 6, zero padding on the right.
    assert merged[0, 1].tolist() == [3, 0, 6, 0, -3, 0, -6, 0]
    assert merged[0, 2].tolist() == [7, 8, 0, 0, -7, -8, 0, 0]
    assert merged[0, 3].tolist() == [9, 0, 0, 0, -9, 0, 0, 0]
    torch.testing.assert_close(merged, _merge_loop(x, 2))


@pytest.mark.parametrize("side, factor", [(4, 2), (5, 2), (7, 3)])
def test_merge_matches_loop_on_random_grids(side, factor):
    x = torch.randn(2, side * side, 3)
    torch.testing.assert_close(merge_patches(x, factor), _merge_loop(x, factor))


def test_downsample_connector_end_to_end():
    torch.manual_seed(0)
    conn = DownsampleMLPConnector(2, 5, factor=2)
    x = torch.randn(2, 9, 2)
    merged = _merge_loop(x, 2)
    w0, b0, w2, b2 = (p for p in conn.parameters())
    expected = F.gelu(merged @ w0.T + b0) @ w2.T + b2
    torch.testing.assert_close(conn(x), expected)
    assert conn.layers[0].in_features == 8
    assert conn.num_output_tokens(9) == 4
    assert conn.num_output_tokens(27 * 27) == 196  # DeepSeek-VL2: 27x27 -> 14x14


def test_downsample_rejects_non_square_grid():
    conn = DownsampleMLPConnector(2, 4)
    with pytest.raises(ValueError, match="square"):
        conn(torch.randn(1, 10, 2))
    with pytest.raises(ValueError, match="square"):
        conn.num_output_tokens(577)


@pytest.mark.parametrize("name", sorted(CONNECTORS))
def test_meta_build_and_registry(name):
    conn = CONNECTORS[name](1152, 2048, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in conn.parameters())
    out = conn(torch.empty(1, 729, 1152, device="meta", dtype=torch.bfloat16))
    assert out.shape == (1, conn.num_output_tokens(729), 2048)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLPConnector(2, 2, activation="swish")
    with pytest.raises(ValueError, match="depth"):
        MLPConnector(2, 2, depth=0)
