"""Connectors (projectors) from vision features to the language model's hidden size.

- ``mlp``: LLaVA-1.5's ``mlp{depth}x_gelu`` (llava/model/multimodal_projector/builder.py), used by
  MoE-LLaVA as ``mlp2x_gelu``: Linear(in -> H), GELU, Linear(H -> H), with biases.
- ``linear``: LLaVA-1's single Linear(in -> H).
- ``downsample_mlp``: DeepSeek-VL2's ``downsample_mlp_gelu`` (deepseek_vl2/models/modeling_deepseek_vl_v2.py,
  ``MlpProjector``): the square token grid is zero-padded at the bottom/right to a multiple of
  ``factor``, each ``factor x factor`` block is merged by ``F.unfold`` (so the merged features are
  channel-major: channel 0 at its f*f positions, then channel 1, ...), then the MLP.

Every connector keeps its layers in ``self.layers`` (an ``nn.Sequential``), so checkpoint keys are
``layers.0.weight``, ``layers.2.weight``, ...: LLaVA's ``mm_projector.{i}.*`` and DeepSeek-VL2's
``projector.layers.{i}.*`` map onto them by renaming the prefix alone.

Shape legend: N images, P tokens per image, C vision feature size, H output hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


def _mlp(in_dim: int, out_dim: int, depth: int, activation: str, device, dtype) -> nn.Sequential:
    if depth < 1:
        raise ValueError(f"connector depth must be at least 1, got {depth}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"connector activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, device=device, dtype=dtype)]
    for _ in range(depth - 1):
        layers += [ACTIVATIONS[activation](), nn.Linear(out_dim, out_dim, device=device, dtype=dtype)]
    return nn.Sequential(*layers)


class MLPConnector(nn.Module):
    """Per-token MLP: Linear(in -> H), then ``depth - 1`` times (activation, Linear(H -> H))."""

    def __init__(
        self, in_dim: int, out_dim: int, depth: int = 2, activation: str = "gelu", *, device=None, dtype=None
    ):
        super().__init__()
        self.layers = _mlp(in_dim, out_dim, depth, activation, device, dtype)

    @classmethod
    def from_spec(cls, node, *, in_dim: int, out_dim: int) -> "MLPConnector":
        return cls(in_dim, out_dim, depth=node.depth, activation=node.activation)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, x_NPC: torch.Tensor) -> torch.Tensor:
        return self.layers(x_NPC)


class LinearConnector(MLPConnector):
    """A single Linear(in -> H): the depth-1 MLP."""

    def __init__(self, in_dim: int, out_dim: int, *, device=None, dtype=None):
        super().__init__(in_dim, out_dim, depth=1, device=device, dtype=dtype)

    @classmethod
    def from_spec(cls, node, *, in_dim: int, out_dim: int) -> "LinearConnector":
        return cls(in_dim, out_dim)


def merge_patches(x_NPC: torch.Tensor, factor: int) -> torch.Tensor:
    """[N, s*s, C] square grid -> [N, ceil(s/f)**2, C*f*f], channel-major within each block."""
    n, p, c = x_NPC.shape
    side = _grid_side(p)
    pad = -side % factor
    x_NCss = x_NPC.reshape(n, side, side, c).permute(0, 3, 1, 2)
    x_NCSS = F.pad(x_NCss, (0, pad, 0, pad))  # zeros at the right and bottom
    x_NKL = F.unfold(x_NCSS, kernel_size=factor, stride=factor)  # K = C*f*f ordered (c, row, col)
    return x_NKL.transpose(1, 2)


def _grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"downsample connector needs a square token grid, got {num_tokens} tokens")
    return side


class DownsampleMLPConnector(nn.Module):
    """DeepSeek-VL2: merge each ``factor x factor`` block of tokens, then the MLP."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        factor: int = 2,
        depth: int = 2,
        activation: str = "gelu",
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if factor < 1:
            raise ValueError(f"downsample factor must be at least 1, got {factor}")
        self.factor = factor
        self.layers = _mlp(in_dim * factor * factor, out_dim, depth, activation, device, dtype)

    @classmethod
    def from_spec(cls, node, *, in_dim: int, out_dim: int) -> "DownsampleMLPConnector":
        return cls(in_dim, out_dim, factor=node.factor, depth=node.depth, activation=node.activation)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return math.ceil(_grid_side(num_input_tokens) / self.factor) ** 2

    def forward(self, x_NPC: torch.Tensor) -> torch.Tensor:
        return self.layers(merge_patches(x_NPC, self.factor))


CONNECTORS: dict[str, type[nn.Module]] = {
    "linear": LinearConnector,
    "mlp": MLPConnector,
    "downsample_mlp": DownsampleMLPConnector,
}
