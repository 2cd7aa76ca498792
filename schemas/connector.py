"""The connector section: how vision features become language-model embeddings."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from moebuild.schemas.base import SmallCount, SpecModel


class LinearConnectorSpec(SpecModel):
    """One Linear(vision hidden -> language hidden) with bias (LLaVA-1.0)."""

    type: Literal["linear"]
    """Selects this kind: linear."""


class MLPConnectorSpec(SpecModel):
    """Linear(vision -> H), then (activation, Linear(H -> H)) depth-1 times (LLaVA mlp2x_gelu at depth 2)."""

    type: Literal["mlp"]
    """Selects this kind: mlp."""
    depth: SmallCount = 2
    """Number of Linear layers."""
    activation: Literal["gelu", "silu", "relu"] = "gelu"
    """Activation between the Linear layers."""


class DownsampleMLPConnectorSpec(SpecModel):
    """DeepSeek-VL2: merge factor x factor neighbouring patches (F.unfold, channel-major), then an MLP."""

    type: Literal["downsample_mlp"]
    """Selects this kind: downsample_mlp."""
    factor: SmallCount = 2
    """Side of the square of patches merged into one token; the grid is zero-padded to a multiple."""
    depth: SmallCount = 2
    """Number of Linear layers."""
    activation: Literal["gelu", "silu", "relu"] = "gelu"
    """Activation between the Linear layers."""


ConnectorSpec = Annotated[
    Union[LinearConnectorSpec, MLPConnectorSpec, DownsampleMLPConnectorSpec], Field(discriminator="type")
]
