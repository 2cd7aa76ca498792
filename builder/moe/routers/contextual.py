"""Routers that see more than their token: a top-k gate over [x, features from the context].

`ContextRouter`: the features are the mean of the token's neighbours on the token graph
(moe/batch.py: image patches on their 2-D grid, text as a causal chain), averaged by
torch-geometric message passing (`SimpleConv(aggr="mean")`, Fey & Lenssen 2019), `hops` times
-- context-aware routing over the patch grid. A token with no neighbour gets zeros.
`QueryRouter`: the features are the mean of the text tokens before the token in its sequence
(padding excluded; zeros when there is none) -- query-dependent gating, where image tokens are
routed by the prompt text that precedes them. Only *preceding* text is pooled: pooling later
text would let routing (and so every later position) see the tokens being predicted. Put the
question before the image to route the image by it.

Both pool within the current call: in cached generation a decode step holds only its new token,
so a text token there has no in-call neighbour or preceding text (zeros) and may route
differently from a full forward. Image tokens always arrive whole in the prefill, so routes over
`tokens: image` decode exactly as a full forward does.

The gate is moe/routers.TopKRouter over 2D inputs (weight [E, 2D]: the token half, then the
context half).

Legend: B batch, S sequence, T = B*S tokens, R tokens of the route, D hidden, N edges.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.nn import functional as F
from torch_geometric.nn import SimpleConv

from moebuild.moe.batch import LayerCall, RouteBatch
from moebuild.moe.routers.base import Router, Routing
from moebuild.moe.routers.topk import TopKRouter


class _FeatureTopKRouter(Router):
    def __init__(self, gate: TopKRouter):
        super().__init__()
        self.gate = gate

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int, **extra) -> "_FeatureTopKRouter":
        """The top-k gate reads [token, context features]: twice the hidden size."""
        gate = TopKRouter(2 * hidden_size, num_experts, node.top_k, score=node.score, normalize=node.normalize)
        return cls(gate, **extra)

    def features(self, call: LayerCall) -> Tensor:
        """Features of every token of the call, [B*S, D]."""
        raise NotImplementedError

    def forward(self, batch: RouteBatch) -> Routing:
        extra_RD = batch.rows(self.features(batch.call)).to(batch.x_RD.dtype)
        return self.gate(replace(batch, x_RD=torch.cat([batch.x_RD, extra_RD], dim=-1)))


def neighbour_mean(x_TD: Tensor, edge_index_2N: Tensor, hops: int = 1) -> Tensor:
    """h <- mean of h over each token's in-neighbours, `hops` times (zeros where there are none)."""
    conv = SimpleConv(aggr="mean")
    h_TD = x_TD
    for _ in range(hops):
        h_TD = conv(h_TD, edge_index_2N)
    return h_TD


def preceding_text_mean(x_BSD: Tensor, text_BS: Tensor) -> Tensor:
    """Per token: the mean of the text tokens strictly before it in its sequence (zeros if none)."""
    text_BS1 = text_BS.unsqueeze(-1).to(x_BSD.dtype)
    sums_BSD = F.pad((x_BSD * text_BS1).cumsum(dim=1), (0, 0, 1, 0))[:, :-1]
    counts_BS1 = F.pad(text_BS1.cumsum(dim=1), (0, 0, 1, 0))[:, :-1]
    return sums_BSD / counts_BS1.clamp_min(1)


class ContextRouter(_FeatureTopKRouter):
    def __init__(self, gate: TopKRouter, hops: int = 1):
        super().__init__(gate)
        self.hops = hops

    @classmethod
    def from_spec(cls, node, *, hidden_size: int, num_experts: int) -> "ContextRouter":
        return super().from_spec(node, hidden_size=hidden_size, num_experts=num_experts, hops=node.hops)

    def features(self, call: LayerCall) -> Tensor:
        return neighbour_mean(call.x_TD, call.edge_index_2N, self.hops)

    def extra_repr(self) -> str:
        return f"hops={self.hops}"


class QueryRouter(_FeatureTopKRouter):
    def features(self, call: LayerCall) -> Tensor:
        x_BSD = call.x_BSD
        return preceding_text_mean(x_BSD, call.text_BS).reshape(-1, x_BSD.shape[-1])
