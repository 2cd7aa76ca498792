"""Pydantic v2 models of the moebuild spec language (no torch import here).

Every node class ends in `Spec`; unions (`VisionSpec`, `ConnectorSpec`, `AttentionSpec`,
`RouterSpec`, `BalancingSpec`) are discriminated by `type`. Router classes also state the
torch-free facts about themselves (`params`, `experts_per_token`, `compares_tokens`).
"""

from moebuild.schemas.base import CrossFieldError, RouterSpecBase, SpecModel
from moebuild.schemas.connector import (
    ConnectorSpec,
    DownsampleMLPConnectorSpec,
    LinearConnectorSpec,
    MLPConnectorSpec,
)
from moebuild.schemas.language import (
    AttentionSpec,
    GroupedQueryAttentionSpec,
    LanguageSpec,
    MultiHeadAttentionSpec,
    MultiHeadLatentAttentionSpec,
)
from moebuild.schemas.moe import (
    AuxFreeBiasSpec,
    BalancingSpec,
    DispatchSpec,
    EntropySpec,
    FirstKDenseSpec,
    LoadBalanceSpec,
    MoESpec,
    ParallelSpec,
    PoolSpec,
    RouteSpec,
    SeqAuxSpec,
    SwitchAuxSpec,
    ZLossSpec,
    indivisible_pools,
    moe_layer_indices,
)
from moebuild.schemas.routers import (
    CapacitySpec,
    ContextRouterSpec,
    CorrectionBiasSpec,
    CurriculumSpec,
    DeepSpeedTop2RouterSpec,
    DenseRouterSpec,
    DynamicTopKRouterSpec,
    ExpertChoiceRouterSpec,
    GroupSpec,
    HierarchicalRouterSpec,
    ModalityMixRouterSpec,
    NoiseSpec,
    QueryRouterSpec,
    RouterSpec,
    SoftRouterSpec,
    ThresholdRouterSpec,
    TopKRouterSpec,
)
from moebuild.schemas.spec import ModelSpec, TokenIdsSpec
from moebuild.schemas.training import StageSpec, TrainingSpec
from moebuild.schemas.vision import (
    ClipVisionSpec,
    DynamicTilingSpec,
    SiglipVisionSpec,
    VisionSpec,
)

__all__ = [name for name in dir() if not name.startswith("_")]
