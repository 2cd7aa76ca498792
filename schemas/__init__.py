"""Pydantic v2 models of the moebuild spec language (no torch import here)."""

from .base import CrossFieldError, SpecModel
from .connector import ConnectorSpec, DownsampleMLPConnector, LinearConnector, MLPConnector
from .language import LanguageSpec
from .moe import (
    CapacitySpec,
    DenseRouter,
    DispatchSpec,
    LoadBalance,
    MoESpec,
    NoiseSpec,
    PoolSpec,
    RouteSpec,
    SwitchAux,
    TopKRouter,
    ZLoss,
    moe_layer_indices,
)
from .spec import ModelSpec, TokenIds
from .training import StageSpec, TrainingSpec
from .vision import ClipVision, DynamicTiling, SiglipVision

__all__ = [name for name in dir() if not name.startswith("_")]
