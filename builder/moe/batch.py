"""What a router may know about its tokens: one `RouteBatch` per route and layer call.

A route's batch holds its tokens' hidden states, modality, validity (padding is not valid) and
sequence, their place among the call's tokens (`index_R`), and the call itself (`LayerCall`),
whose token graph is built on first use only (by the `context` router) and shared by every route
of the call. Every router is called the same way, `router(batch) -> Routing`.

The token graph follows the layout of LLaVA-style prompts: a run of consecutive image tokens is
one image, laid row-major on a grid of width ceil(sqrt(run length)) (the exact patch grid for the
square images of CLIP/SigLIP towers; two images placed back to back without a separator read as
one run); its patches are linked to their 4 grid neighbours, both ways, since an image always
arrives whole in one call. Text tokens form a causal chain, each hearing only the previous text
token of its sequence: a link to the next token would leak the token being predicted into the
routing. Padding has no edges; no edge leaves a sequence or joins text to image.

Legend: B batch, S sequence, T = B*S tokens of the call, R tokens of the route, D hidden,
I image tokens, N edges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch_geometric.utils import to_undirected

from moebuild.parallel.expert import local_sum

TEXT, IMAGE = 0, 1  # modality codes of tokens


@dataclass
class LayerCall:
    """Every token of one MoE layer call, whatever route it takes."""

    x_BSD: Tensor
    modality_BS: Tensor  # TEXT / IMAGE (padding keeps whatever it was given)
    valid_BS: Tensor  # bool: not padding
    # sum of a per-call statistic over every process's call (expert parallelism); here: itself
    reduce: Callable[[Tensor], Tensor] = local_sum

    @classmethod
    def of(cls, x_BSD: Tensor, modality_BS: Tensor | None = None, valid_BS: Tensor | None = None,
           reduce: Callable[[Tensor], Tensor] = local_sum) -> LayerCall:
        """A call whose modality defaults to all text and validity to all real tokens."""
        B, S, _ = x_BSD.shape
        if modality_BS is None:
            modality_BS = torch.full((B, S), TEXT, dtype=torch.long, device=x_BSD.device)
        if valid_BS is None:
            valid_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        return cls(x_BSD, modality_BS, valid_BS, reduce)

    @property
    def num_seqs(self) -> int:
        return self.x_BSD.shape[0]

    @property
    def x_TD(self) -> Tensor:
        return self.x_BSD.reshape(-1, self.x_BSD.shape[-1])

    @cached_property
    def seq_T(self) -> Tensor:
        """Sequence (batch row) of every token."""
        B, S = self.valid_BS.shape
        return torch.arange(B, device=self.valid_BS.device).repeat_interleave(S)

    @cached_property
    def text_BS(self) -> Tensor:
        return self.valid_BS & (self.modality_BS == TEXT)

    @cached_property
    def image_BS(self) -> Tensor:
        return self.valid_BS & (self.modality_BS == IMAGE)

    def route(self, index_R: Tensor | None) -> RouteBatch:
        """The batch of a route over the tokens `index_R` of this call (None: all of them, as they are)."""
        modality_T, valid_T = self.modality_BS.reshape(-1), self.valid_BS.reshape(-1)
        if index_R is None:
            return RouteBatch(self.x_TD, modality_T, valid_T, None, self)
        return RouteBatch(self.x_TD[index_R], modality_T[index_R], valid_T[index_R], index_R, self)

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
        same_sequence = self.seq_T[index_X[1:]] == self.seq_T[index_X[:-1]]
        return torch.stack([index_X[:-1][same_sequence], index_X[1:][same_sequence]])


@dataclass
class RouteBatch:
    """The tokens of one route in one layer call: what a router may know about them."""

    x_RD: Tensor  # hidden states
    modality_R: Tensor  # TEXT / IMAGE
    valid_R: Tensor  # bool: not padding
    index_R: Tensor | None  # the route's tokens among the call's B*S; None = all of them, in order
    call: LayerCall
    num_seqs: int = 0  # sequences the tokens come from; 0 = the call's

    def __post_init__(self):
        self.num_seqs = self.num_seqs or self.call.num_seqs

    @classmethod
    def of(cls, x_TD: Tensor, valid_T: Tensor | None = None, seq_T: Tensor | None = None,
           modality_T: Tensor | None = None) -> RouteBatch:
        """Tokens given on their own (for routers used outside a layer): all real unless `valid_T`
        says, all text unless `modality_T` says, one sequence unless `seq_T` says. Their call is
        one row of T tokens, so a `context` router sees one sequence whatever `seq_T` says."""
        call = LayerCall.of(x_TD[None], None if modality_T is None else modality_T[None],
                            None if valid_T is None else valid_T[None])
        batch = call.route(None)
        if seq_T is not None:
            batch.seq_R, batch.num_seqs = seq_T, int(seq_T.max()) + 1 if seq_T.numel() else 1
        return batch

    @cached_property
    def seq_R(self) -> Tensor:
        """int64: the sequence (batch row) of each token; made on first read (few routers and terms need it)."""
        return self.rows(self.call.seq_T)

    @property
    def reduce(self) -> Callable[[Tensor], Tensor]:
        """Sums a statistic of these tokens over the tokens of every rank (expert parallelism): what a
        router or balancing term that averages over the batch divides by the group's totals with."""
        return self.call.reduce

    def rows(self, features_TF: Tensor) -> Tensor:
        """The route's rows of a tensor over the call's tokens."""
        return features_TF if self.index_R is None else features_TF[self.index_R]
