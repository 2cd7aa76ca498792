"""The MoE layer runtime: the layer (layer.py), what a router knows of its tokens (batch.py), the
routers (routers/), expert pools (experts.py), dispatch backends (dispatch.py), balancing terms."""

from moebuild.moe.balancing import (
    BalancingCallback,
    BalancingTerm,
    BiasBalancing,
    Entropy,
    LoadBalance,
    SeqAux,
    SwitchAux,
    ZLoss,
    entropy,
    load_balance,
    seq_aux,
    switch_aux,
    z_loss,
)
from moebuild.moe.batch import IMAGE, TEXT, LayerCall, RouteBatch
from moebuild.moe.dispatch import BACKENDS, get_dispatch
from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import SELECTORS, MoELayer, MoELayerOutput, Route
from moebuild.moe.routers.base import Capacity, Router, Routing
from moebuild.moe.routers.contextual import ContextRouter, QueryRouter
from moebuild.moe.routers.deepspeed import DeepSpeedTop2Router
from moebuild.moe.routers.dynamic import DynamicTopKRouter, ThresholdRouter
from moebuild.moe.routers.expert_choice import ExpertChoiceRouter
from moebuild.moe.routers.hierarchical import HierarchicalRouter, ModalityMixRouter
from moebuild.moe.routers.soft import SoftRouter
from moebuild.moe.routers.topk import DenseRouter, TopKRouter

__all__ = [name for name in dir() if not name.startswith("_")]
