"""The MoE layer runtime: routers, expert pools, dispatch backends, balancing terms, the layer."""

from moebuild.moe.balancing import TERMS, load_balance, switch_aux, z_loss
from moebuild.moe.dispatch import BACKENDS, get_dispatch
from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import IMAGE, SELECTORS, TEXT, BalancingTerm, MoELayer, MoELayerOutput, Route
from moebuild.moe.routers import DenseRouter, Routing, TopKRouter

__all__ = [
    "BACKENDS",
    "IMAGE",
    "SELECTORS",
    "TERMS",
    "TEXT",
    "BalancingTerm",
    "DenseRouter",
    "ExpertPool",
    "MoELayer",
    "MoELayerOutput",
    "Route",
    "Routing",
    "TopKRouter",
    "get_dispatch",
    "load_balance",
    "switch_aux",
    "z_loss",
]
