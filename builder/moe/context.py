"""What a router that looks beyond its own token is given: the routing context of one layer call.

The MoE layer builds one `RoutingContext` per call, only when a route's router declares
`needs_context = True`, and calls that router as `router(x_RD, context, index_R)`, where
`index_R` are the route's tokens among the call's T = B*S tokens.

The token graph (for `context` routers, moe/contextual.py) follows the layout of LLaVA-style
prompts: a run of consecutive image tokens is one image, laid row-major on a grid of width
ceil(sqrt(run length)) (the exact patch grid for the square images of CLIP/SigLIP towers; two
images placed back to back without a separator read as one run); its patches are linked to their
4 grid neighbours, both ways, since an image always arrives whole in one call. Text tokens form
a causal chain, each hearing only the previous text token of its sequence: a link to the next
token would leak the token being predicted into the routing. Padding has no edges; no edge
leaves a sequence or joins text to image.

Legend: B batch, S sequence, T = B*S tokens, D hidden, N edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch_geometric.utils import to_undirected


@dataclass
class RoutingContext:
    x_BSD: Tensor  # the layer's input: every token of the call, whatever route it takes
    modality_BS: Tensor  # 0 text, 1 image (padding keeps whatever it was given)
    text_BS: Tensor  # bool: non-padding text tokens
    image_BS: Tensor  # bool: non-padding image tokens

    @property
    def x_TD(self) -> Tensor:
        return self.x_BSD.reshape(-1, self.x_BSD.shape[-1])

    @property
    def modality_T(self) -> Tensor:
        return self.modality_BS.reshape(-1)

    @cached_property
    def batch_T(self) -> Tensor:
        """Sequence index of every token."""
        B, S = self.text_BS.shape
        return torch.arange(B, device=self.text_BS.device).repeat_interleave(S)

    @cached_property
    def position_T(self) -> Tensor:
        """Position of every token in its sequence, within this call."""
        B, S = self.text_BS.shape
        return torch.arange(S, device=self.text_BS.device).repeat(B)

    @cached_property
    def _image_runs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per image token (I of them): flat index, offset in its run, run length, grid width."""
        image_T = self.image_BS.reshape(-1)
        previous_BS = torch.zeros_like(self.image_BS)
        previous_BS[:, 1:] = self.image_BS[:, :-1]
        start_T = (self.image_BS & ~previous_BS).reshape(-1)
        run_I = (start_T.cumsum(0) - 1)[image_T]  # which image run (one image) each token is in
        index_I = image_T.nonzero().squeeze(1)
        offset_I = index_I - start_T.nonzero().squeeze(1)[run_I]
        length_I = torch.bincount(run_I, minlength=int(start_T.sum()))[run_I]
        width_I = torch.sqrt(length_I.double()).ceil().long()
        return index_I, offset_I, length_I, width_I

    @cached_property
    def grid_T2(self) -> Tensor:
        """(row, col) of every image token on its image's grid; -1 for other tokens."""
        index_I, offset_I, _, width_I = self._image_runs
        grid_T2 = torch.full((self.image_BS.numel(), 2), -1, dtype=torch.long, device=index_I.device)
        grid_T2[index_I] = torch.stack([offset_I // width_I, offset_I % width_I], dim=1)
        return grid_T2

    @cached_property
    def edge_index_2N(self) -> Tensor:
        """The token graph, source row 0 -> target row 1 (PyG's `source_to_target` flow)."""
        return torch.cat([self._grid_edges(), self._text_chain_edges()], dim=1)

    def _grid_edges(self) -> Tensor:
        index_I, offset_I, length_I, width_I = self._image_runs
        # A neighbour exists while it is still inside the run: next column, or next row.
        right_I = (offset_I % width_I < width_I - 1) & (offset_I + 1 < length_I)
        down_I = offset_I + width_I < length_I
        source_N = torch.cat([index_I[right_I], index_I[down_I]])
        target_N = torch.cat([index_I[right_I] + 1, (index_I + width_I)[down_I]])
        return to_undirected(torch.stack([source_N, target_N]), num_nodes=self.image_BS.numel())

    def _text_chain_edges(self) -> Tensor:
        index_X = self.text_BS.reshape(-1).nonzero().squeeze(1)
        same_sequence = self.batch_T[index_X[1:]] == self.batch_T[index_X[:-1]]
        return torch.stack([index_X[:-1][same_sequence], index_X[1:][same_sequence]])
