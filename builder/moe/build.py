"""Spec -> MoE modules: one build function per node of the `moe` section.

`MOE_BUILDERS` maps each schema class to its build function and is merged into
`moebuild.compile.BUILDERS`; adding a router type is one schema class, one module, one entry here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moebuild.schemas import DenseRouter, MoESpec, PoolSpec, TopKRouter

from . import routers
from .experts import ExpertPool
from .layer import BalancingTerm, MoELayer, Route

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


def build_topk_router(node: TopKRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    capacity = node.capacity
    noise = None if node.noise is None or node.noise.type == "none" else node.noise
    return routers.TopKRouter(
        hidden_size,
        num_experts,
        node.top_k,
        score=node.score,
        normalize=node.normalize,
        scale=node.scale,
        noise=None if noise is None else noise.type,
        noise_std=None if noise is None else noise.std,
        capacity_train=capacity.train if capacity else None,
        capacity_eval=capacity.eval if capacity else None,
        min_capacity=capacity.min if capacity else 0,
        router_dtype=DTYPES[node.dtype],
    )


def build_dense_router(node: DenseRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return routers.DenseRouter(num_experts)


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
    terms = [BalancingTerm(term.type, term.coef, tokens=term.tokens) for term in node.balancing]
    return MoELayer(routes, terms, pools)


def build_router(node, *, hidden_size: int, num_experts: int) -> nn.Module:
    return ROUTER_BUILDERS[type(node)](node, hidden_size=hidden_size, num_experts=num_experts)


ROUTER_BUILDERS: dict[type, Callable[..., nn.Module]] = {
    TopKRouter: build_topk_router,
    DenseRouter: build_dense_router,
}

MOE_BUILDERS: dict[type, Callable[..., nn.Module]] = {
    PoolSpec: build_pool,
    MoESpec: build_moe,
    **ROUTER_BUILDERS,
}
