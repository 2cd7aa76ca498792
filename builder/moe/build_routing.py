"""Spec -> module for the modality-aware routers of schemas/routing.py; merged into
`moebuild.moe.build.ROUTER_BUILDERS`. Each takes the route's pool size and the hidden size."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moebuild.schemas.routing import ContextRouter, HierarchicalRouter, ModalityMixRouter, QueryRouter

from . import contextual, hierarchical
from .routers import TopKRouter


def _group_sizes(node: HierarchicalRouter | ModalityMixRouter, num_experts: int) -> list[int]:
    sizes = list(node.groups.values())
    if sum(sizes) != num_experts:
        raise ValueError(f"{node.type} groups {node.groups} hold {sum(sizes)} experts, the pool has {num_experts}")
    return sizes


def build_hierarchical_router(node: HierarchicalRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    sizes = _group_sizes(node, num_experts)
    return hierarchical.HierarchicalRouter(hidden_size, sizes, node.top_groups, node.top_k, normalize=node.normalize)


def build_modality_mix_router(node: ModalityMixRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return hierarchical.ModalityMixRouter(hidden_size, _group_sizes(node, num_experts), node.top_k, normalize=node.normalize)


def _gate(node: ContextRouter | QueryRouter, hidden_size: int, num_experts: int) -> TopKRouter:
    """The top-k gate over [token, context features]: twice the hidden size."""
    return TopKRouter(2 * hidden_size, num_experts, node.top_k, score=node.score, normalize=node.normalize)


def build_context_router(node: ContextRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return contextual.ContextRouter(_gate(node, hidden_size, num_experts), hops=node.hops)


def build_query_router(node: QueryRouter, *, hidden_size: int, num_experts: int) -> nn.Module:
    return contextual.QueryRouter(_gate(node, hidden_size, num_experts))


ROUTING_BUILDERS: dict[type, Callable[..., nn.Module]] = {
    HierarchicalRouter: build_hierarchical_router,
    ModalityMixRouter: build_modality_mix_router,
    ContextRouter: build_context_router,
    QueryRouter: build_query_router,
}
