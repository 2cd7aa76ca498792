"""The MoE layer runtime: routers, expert pools, dispatch backends, balancing terms, the layer."""

from moebuild.moe.balancing import TERMS, BalancingCallback, entropy, load_balance, seq_aux, switch_aux, z_loss
from moebuild.moe.deepspeed import DeepSpeedTop2Router
from moebuild.moe.dispatch import BACKENDS, get_dispatch
from moebuild.moe.dynamic_routers import DynamicTopKRouter, ThresholdRouter
from moebuild.moe.expert_choice import ExpertChoiceRouter
from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import IMAGE, SELECTORS, TEXT, BalancingTerm, BiasBalancing, MoELayer, MoELayerOutput, Route
from moebuild.moe.routers import DenseRouter, TopKRouter
from moebuild.moe.routing import Capacity, RouteTokens, Routing
from moebuild.moe.soft import SoftRouter

__all__ = [
    "BACKENDS",
    "IMAGE",
    "SELECTORS",
    "TERMS",
    "TEXT",
    "BalancingCallback",
    "BalancingTerm",
    "BiasBalancing",
    "Capacity",
    "DeepSpeedTop2Router",
    "DenseRouter",
    "DynamicTopKRouter",
    "ExpertChoiceRouter",
    "ExpertPool",
    "MoELayer",
    "MoELayerOutput",
    "Route",
    "RouteTokens",
    "Routing",
    "SoftRouter",
    "ThresholdRouter",
    "TopKRouter",
    "entropy",
    "get_dispatch",
    "load_balance",
    "seq_aux",
    "switch_aux",
    "z_loss",
]
