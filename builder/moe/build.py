"""Spec -> MoE modules: one build function per node of the `moe` section.

`MOE_BUILDERS` maps each schema class to its build function and is merged into
`moebuild.compile.BUILDERS`; adding a router type is one schema class, one module, one entry here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moebuild.schemas.moe import (
    AuxFreeBias,
    DeepSpeedTop2Router,
    DenseRouter,
    DynamicTopKRouter,
    ExpertChoiceRouter,
    MoESpec,
    PoolSpec,
    SoftRouter,
    ThresholdRouter,
    TopKRouter,
)

from . import routers
from .build_routing import ROUTING_BUILDERS
from .experts import ExpertPool
from .deepspeed import DeepSpeedTop2Router as DeepSpeedTop2Module
from .dynamic_routers import DynamicTopKRouter as DynamicTopKModule
from .dynamic_routers import ThresholdRouter as ThresholdModule
from .expert_choice import ExpertChoiceRouter as ExpertChoiceModule
from .layer import BalancingTerm, BiasBalancing, MoELayer, Route
from .routing import Capacity
from .soft import SoftRouter as SoftModule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_pool(node: PoolSpec, *, hidden_size: int, backend: str = "auto") -> ExpertPool:
    pool = ExpertPool(
        node.num_experts,
        hidden_size,
        node.intermediate_size,
        activation=node.activation,
        gated=node.gated,
        bias=node.bias,
        backend=backend,
    )
    pool.upcycle = node.init == "upcycle"  # read by init_custom_weights: experts start as copies
    return pool


def build_capacity(node) -> Capacity | None:
    return None if node is None else Capacity(node.train, node.eval, node.min, node.drop)


def build_topk_router(node: TopKRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    noise = None if node.noise is None or node.noise.type == "none" else node.noise
    groups, curriculum = node.groups, node.curriculum
    return routers.TopKRouter(
        hidden_size,
        num_experts,
        node.top_k,
        score=node.score,
        order=node.order,
        normalize=node.normalize,
        scale=node.scale,
        noise=None if noise is None else noise.type,
        noise_std=None if noise is None else noise.std,
        capacity=build_capacity(node.capacity),
        num_groups=groups.num_groups if groups else 1,
        top_groups=groups.top_groups if groups else 1,
        group_rank=groups.rank_by if groups else "top2_sum",
        correction_bias=bool(node.bias),
        expert_dropout=node.expert_dropout,
        curriculum=(curriculum.start_k, curriculum.steps_per_k) if curriculum else None,
        router_dtype=DTYPES[node.dtype],
    )


def build_deepspeed_top2_router(node: DeepSpeedTop2Router, *, hidden_size: int, num_experts: int) -> nn.Module:
    return DeepSpeedTop2Module(hidden_size, num_experts, build_capacity(node.capacity), eval_noise=node.eval_noise,
                               router_dtype=DTYPES[node.dtype])


def build_expert_choice_router(node: ExpertChoiceRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return ExpertChoiceModule(hidden_size, num_experts, node.capacity_factor, router_dtype=DTYPES[node.dtype])


def build_soft_router(node: SoftRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return SoftModule(hidden_size, num_experts, node.slots_per_expert, router_dtype=DTYPES[node.dtype])


def build_threshold_router(node: ThresholdRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return ThresholdModule(hidden_size, num_experts, node.threshold, node.max_experts,
                           normalize=node.normalize, scale=node.scale, router_dtype=DTYPES[node.dtype])


def build_dynamic_topk_router(node: DynamicTopKRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return DynamicTopKModule(hidden_size, num_experts, node.top_k, node.tail_top_k,
                             normalize=node.normalize, scale=node.scale, router_dtype=DTYPES[node.dtype])


def build_dense_router(node: DenseRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return routers.DenseRouter(num_experts, hidden_size, gate=node.gate)


def build_balancing(term):
    if isinstance(term, AuxFreeBias):
        return BiasBalancing(term.rate, tokens=term.tokens)
    return BalancingTerm(term.type, term.coef, tokens=term.tokens)


def build_moe(node: MoESpec, *, hidden_size: int) -> MoELayer:
    pools = {name: build_pool(pool, hidden_size=hidden_size, backend=node.dispatch.backend) for name, pool in node.pools.items()}
    routes = [
        Route(
            build_router(route.router, hidden_size=hidden_size, num_experts=node.pools[route.pool].num_experts),
            route.pool,
            tokens=route.tokens,
        )
        for route in node.routes
    ]
    terms = [build_balancing(term) for term in node.balancing]
    updates = node.router_bias_updates()
    if updates:  # `bias: {update_rate}` on routers: one bias term over the tokens those routes see
        tokens = {t for _, t in updates}
        terms.append(BiasBalancing(updates[0][0], tokens=tokens.pop() if len(tokens) == 1 else "all"))
    return MoELayer(routes, terms, pools)


def build_router(node, *, hidden_size: int, num_experts: int) -> nn.Module:
    return ROUTER_BUILDERS[type(node)](node, hidden_size=hidden_size, num_experts=num_experts)


ROUTER_BUILDERS: dict[type, Callable[..., nn.Module]] = {
    TopKRouter: build_topk_router,
    DenseRouter: build_dense_router,
    DeepSpeedTop2Router: build_deepspeed_top2_router,
    ExpertChoiceRouter: build_expert_choice_router,
    SoftRouter: build_soft_router,
    ThresholdRouter: build_threshold_router,
    DynamicTopKRouter: build_dynamic_topk_router,
    **ROUTING_BUILDERS,
}

MOE_BUILDERS: dict[type, Callable[..., nn.Module]] = {
    PoolSpec: build_pool,
    MoESpec: build_moe,
    **ROUTER_BUILDERS,
}
