"""DeepSeek-VL2's image token layout: tiles of projected features arranged on their 2-D grid.

Follows deepseek_vl2/models/modeling_deepseek_vl_v2.py (``DeepseekVLV2ForCausalLM.prepare_inputs_embeds``,
``global_view_pos == "head"``). Each picture arrives as views: a global view, then ``rows x cols``
local tiles in row-major order (the order ``moebuild.model.processing.TiledImageProcessor`` cuts them).
With ``s`` tokens per tile side after the connector, a picture becomes

- the global view as ``s`` rows of ``s`` tokens, each row followed by the learned ``image_newline``;
- the learned ``view_separator`` (spelled ``view_seperator`` in their code);
- the local tiles stitched into one ``(rows * s) x (cols * s)`` grid, each row followed by the newline:

``s * (s + 1) + 1 + (rows * s) * (cols * s + 1)`` tokens: 421 / 1023 / 2017 for 1x1 / 2x2 / 3x3
grids with s = 14 (SigLIP-SO400M/384 with a 2x2 downsample connector). Without a global view only
the local grid is laid out, and there is no separator.

Shape legend: V views, P tokens per view (s * s), H language hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def tiled_token_count(side: int, grid: tuple[int, int], global_view: bool = True) -> int:
    """Tokens one picture takes: the global view with newlines, the separator, the local grid with newlines."""
    cols, rows = grid
    local = (rows * side) * (cols * side + 1)
    return side * (side + 1) + 1 + local if global_view else local


class TiledConnector(nn.Module):
    """A connector (`projector`) plus the learned tokens DeepSeek-VL2 puts between and after tile rows.

    Called on views it is the projector alone (one token sequence per view); `arrange` lays the
    projected views of each picture out as the sequence the language model reads.
    """

    def __init__(self, projector: nn.Module, hidden_size: int, global_view: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.projector = projector
        # DeepSeek-VL2 draws both from N(0, 1 / hidden_size).
        std = hidden_size**-0.5
        self.image_newline = nn.Parameter(torch.randn(hidden_size, device=device, dtype=dtype) * std)
        self.view_separator = (
            nn.Parameter(torch.randn(hidden_size, device=device, dtype=dtype) * std) if global_view else None
        )

    @property
    def global_view(self) -> bool:
        return self.view_separator is not None

    def num_output_tokens(self, num_input_tokens: int) -> int:
        """Tokens of one view, before any layout."""
        return self.projector.num_output_tokens(num_input_tokens)

    def forward(self, x_VPC: torch.Tensor) -> torch.Tensor:
        return self.projector(x_VPC)

    def _rows_with_newlines(self, grid_hwH: torch.Tensor) -> torch.Tensor:
        """[h, w, H] -> [h * (w + 1), H]: every row of tokens followed by the newline."""
        h, _, hidden = grid_hwH.shape
        newline_h1H = self.image_newline.to(grid_hwH.dtype).expand(h, 1, hidden)
        return torch.cat([grid_hwH, newline_h1H], dim=1).reshape(-1, hidden)

    def arrange_one(self, views_VPH: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One picture's views (global first, then the tiles row-major) -> its token sequence [T, H]."""
        cols, rows = grid
        _, p, hidden = views_VPH.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"tiled layout needs a square token grid per view, got {p} tokens")
        pieces = []
        if self.global_view:
            global_ssH = views_VPH[0].reshape(side, side, hidden)
            pieces += [self._rows_with_newlines(global_ssH), self.view_separator.to(views_VPH.dtype)[None]]
            views_VPH = views_VPH[1:]
        tiles_rcssH = views_VPH.reshape(rows, cols, side, side, hidden)
        local_hwH = tiles_rcssH.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, hidden)  # (rows s) (cols s) H
        pieces.append(self._rows_with_newlines(local_hwH))
        return torch.cat(pieces)

    def views_per_picture(self, grids: Sequence[tuple[int, int]]) -> list[int]:
        """Views each picture has in `pixel_values`: its local tiles, plus the global view."""
        return [int(c) * int(r) + self.global_view for c, r in grids]

    def arrange(self, views_VPH: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Every picture's token sequence, concatenated in order: [sum of T, H].

        `grids` holds (columns, rows) of local tiles per picture, as the processor's `tile_grids`.
        """
        per_picture = self.views_per_picture(grids)
        if sum(per_picture) != views_VPH.shape[0]:
            raise ValueError(
                f"image_grids {[tuple(map(int, g)) for g in grids]} need {sum(per_picture)} views "
                f"(global view + tiles per image), but pixel_values holds {views_VPH.shape[0]}"
            )
        pictures = torch.split(views_VPH, per_picture)
        return torch.cat([self.arrange_one(views, (int(c), int(r))) for views, (c, r) in zip(pictures, grids)])
