"""Collect routing decisions over batches: `trace(model, batch) -> RoutingTrace`.

A forward hook on every route's router sees the route's `RouteBatch` and `Routing` (the decision
the layer then applies); the per-modality counts come from `moebuild.moe.stats.route_stats`, the
same code `output_router_stats=True` runs, and are summed over calls. Added here: selected slots
(for the dropped fraction over many batches), co-activation counts (E x E: tokens that kept both
experts; the diagonal is the load), the routing-probability variance (RPV) of every token, as
LTDR's dynamic_topk router computes it (population variance of the router's scores across experts)
with the route's mean RPV per call, LTDR's tail threshold, and each image token's top-1 expert (the
kept slot of highest weight) for patch maps. Routes whose tokens take every expert or a mixture of
slots (dense, soft) have no top-1: their kind says so and their patch maps are empty.

Legend: B batch, S sequence, T = B*S tokens of a call, R tokens of a route, E experts, K slots.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moebuild.moe.batch import IMAGE, TEXT
from moebuild.moe.layer import MoELayer
from moebuild.moe.routers.soft import SoftRouting
from moebuild.moe.routers.topk import DenseRouter
from moebuild.moe.stats import route_stats
from moebuild.tracing.summary import RunningSummary

GROUPS = ("all", "text", "image")
NO_TOP1 = -1  # a route without a top-1 expert (dense / soft), or a token with no kept slot


@dataclass
class GroupCounts:
    """Sums over calls for one (layer, route, modality group)."""

    num_experts: int
    tokens: int = 0
    selected: int = 0  # slots chosen before capacity
    entropy_sum: float = 0.0
    has_entropy: bool = False
    tail: int = 0
    has_tail: bool = False
    load: Tensor = None  # int64 [E], kept assignments per expert
    coactivation: Tensor = None  # int64 [E, E]
    rpv: RunningSummary = field(default_factory=RunningSummary)  # of every token's RPV

    def __post_init__(self):
        E = self.num_experts
        self.load = torch.zeros(E, dtype=torch.int64)
        self.coactivation = torch.zeros(E, E, dtype=torch.int64)

    def to_dict(self) -> dict:
        kept = int(self.load.sum())
        rpv = self.rpv
        sample = rpv.sample() if len(rpv) else None
        out = {
            "tokens": self.tokens,
            "load": self.load.tolist(),
            "selected_slots": self.selected,
            "kept_slots": kept,
            "dropped_fraction": (self.selected - kept) / self.selected if self.selected else 0.0,
            "experts_per_token": kept / self.tokens if self.tokens else 0.0,
            "entropy": self.entropy_sum / self.tokens if self.has_entropy and self.tokens else None,
            "tail_share": self.tail / self.tokens if self.has_tail and self.tokens else None,
            "rpv": None if not len(rpv) else {
                "mean": rpv.mean, "std": rpv.std, "min": rpv.min, "max": rpv.max,
                "quantiles": dict(zip(("p50", "p90", "p99"), _quantiles(sample, (0.5, 0.9, 0.99)))),
                "quantile_sample": len(sample),  # every token's value up to SAMPLE_SIZE
            },
            "coactivation": self.coactivation.tolist(),
        }
        return out


def _quantiles(x: Tensor, qs: tuple[float, ...]) -> list[float]:
    """torch.quantile's linear interpolation, from one sort (torch.quantile refuses inputs over 2^24
    values)."""
    sorted_x = x.double().sort().values
    out = []
    for q in qs:
        position = q * (len(sorted_x) - 1)
        low = int(position)
        high = min(low + 1, len(sorted_x) - 1)
        out.append(float(sorted_x[low] + (sorted_x[high] - sorted_x[low]) * (position - low)))
    return out


def route_kind(router, routing) -> str:
    """"top1" when tokens have a top-1 expert; "dense" or "soft" when they have none."""
    if isinstance(routing, SoftRouting):
        return "soft"
    if isinstance(router, DenseRouter):
        return "dense"
    return "top1"


@dataclass
class RouteTrace:
    name: str
    tokens: str  # the route's selector: all / text / image
    router: str  # router class name
    kind: str  # top1 / dense / soft
    num_experts: int
    groups: dict[str, GroupCounts]
    thresholds: list[tuple[float, int]] = field(default_factory=list)  # (mean RPV of a call, its tokens)

    @property
    def tail_threshold(self) -> float | None:
        n = sum(t for _, t in self.thresholds)
        return sum(v * t for v, t in self.thresholds) / n if n else None


@dataclass
class LayerTrace:
    index: int  # decoder layer index
    routes: dict[str, RouteTrace] = field(default_factory=dict)


@dataclass
class ImageTrace:
    """One image of the inputs: its tokens' top-1 expert per layer and route (-1 none)."""

    index: int
    num_tokens: int
    top1: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # layer -> route -> [tokens]


def _layer_index(name: str, fallback: int) -> int:
    match = re.search(r"layers\.(\d+)\.", name + ".")
    return int(match.group(1)) if match else fallback


def moe_layers(model) -> list[tuple[int, MoELayer]]:
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)]
    return [(_layer_index(name, i), module) for i, (name, module) in enumerate(found)]


class Recorder:
    """Hooks on every router of `model`; `record()` around a forward collects into `trace`.

    `top1`: also keep each call token's top-1 expert (`calls`), which only `trace`'s image patch
    maps read; training's per-checkpoint trace leaves it out."""

    def __init__(self, model, trace: "RoutingTrace", top1: bool = True):
        self.model, self.trace, self.top1 = model, trace, top1
        self.calls: dict[tuple[int, str], Tensor] = {}  # top-1 per call token [B, S] for this forward

    @contextmanager
    def record(self):
        handles = []
        for index, layer in moe_layers(self.model):
            self.trace.layers.setdefault(index, LayerTrace(index))
            for route in layer.routes:
                pool = layer.pools[route.pool]
                handles.append(route.router.register_forward_hook(self._hook(index, route, pool.num_experts)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer: int, route, num_experts: int):
        def hook(router, args, routing):
            self._collect(layer, route, num_experts, router, args[0], routing)
        return hook

    @torch.no_grad()
    def _collect(self, layer: int, route, E: int, router, batch, routing) -> None:
        kind = route_kind(router, routing)
        traced = self.trace.layers[layer].routes.get(route.name)
        if traced is None:
            groups = {g: GroupCounts(E) for g in GROUPS if g == "all" or route.tokens in ("all", g)}
            traced = RouteTrace(route.name, route.tokens, type(router).__name__, kind, E, groups)
            self.trace.layers[layer].routes[route.name] = traced
        valid_R, modality_R = batch.valid_R, batch.modality_R
        stats = route_stats(routing, E, valid_R, modality_R, route.tokens)
        ids_RK, topk_RK = routing.ids_TK.cpu(), routing.topk_ids_TK.cpu()
        kept_RK = ids_RK >= 0
        onehot_RE = torch.zeros(ids_RK.shape[0], E, dtype=torch.int64)
        onehot_RE.scatter_add_(1, ids_RK.clamp_min(0), kept_RK.long())
        onehot_RE = onehot_RE.clamp_max(1)
        rpv_R = None
        if routing.probs_TE is not None:
            probs_RE = routing.probs_TE.float().cpu()
            rpv_R = (probs_RE - probs_RE.mean(dim=-1, keepdim=True)).square().mean(dim=-1)
            valid = valid_R.cpu()
            if valid.any():
                traced.thresholds.append((float(rpv_R[valid].mean()), int(valid.sum())))
        for group, counts in traced.groups.items():
            s = stats[group]
            mask = valid_R.cpu() if group == "all" else valid_R.cpu() & (modality_R.cpu() == (TEXT if group == "text"
                                                                                               else IMAGE))
            n = int(s["tokens"])
            counts.tokens += n
            counts.load += s["load"].cpu()
            counts.selected += int((topk_RK[mask] >= 0).sum())
            if "entropy" in s:
                counts.has_entropy = True
                counts.entropy_sum += float(s["entropy"]) * n
            if "tail_share" in s:
                counts.has_tail = True
                counts.tail += int(routing.tail_T.cpu()[mask].sum())
            m_RE = onehot_RE[mask]
            counts.coactivation += m_RE.t() @ m_RE
            if rpv_R is not None:
                counts.rpv.add(rpv_R[mask])
        if not self.top1:
            return
        # top-1 of every call token this route took (-1: none, or not on this route)
        B, S = batch.call.valid_BS.shape
        top1_T = self.calls.setdefault((layer, route.name), torch.full((B * S,), NO_TOP1, dtype=torch.int64))
        if kind == "top1":
            weights_RK = routing.weights_TK.float().cpu().masked_fill(~kept_RK, -1.0)
            best_R = weights_RK.argmax(dim=-1, keepdim=True)
            top_R = ids_RK.gather(1, best_R).squeeze(1)
            index_R = torch.arange(B * S) if batch.index_R is None else batch.index_R.cpu()
            top1_T[index_R] = top_R


@dataclass
class RoutingTrace:
    """Routing of a model over the batches traced so far (`trace(model, batch, into=...)` adds one)."""

    layers: dict[int, LayerTrace] = field(default_factory=dict)
    images: list[ImageTrace] = field(default_factory=list)
    model_name: str = ""
    batches: int = 0

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "batches": self.batches,
            "layers": [
                {"layer": layer.index, "routes": {
                    name: {"tokens": r.tokens, "router": r.router, "kind": r.kind, "num_experts": r.num_experts,
                           "tail_threshold": r.tail_threshold,
                           **{g: c.to_dict() for g, c in r.groups.items()}}
                    for name, r in layer.routes.items()}}
                for layer in sorted(self.layers.values(), key=lambda x: x.index)
            ],
            "images": [{"index": im.index, "num_tokens": im.num_tokens,
                        "top1": {str(layer): routes for layer, routes in im.top1.items()}} for im in self.images],
        }

    def to_json(self, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent)

    def layer_indices(self) -> list[int]:
        return sorted(self.layers)

    def plot_load_heatmap(self, path=None):
        from moebuild.tracing.plots import plot_load_heatmap

        return plot_load_heatmap(self, path)

    def plot_load_distribution(self, path=None):
        from moebuild.tracing.plots import plot_load_distribution

        return plot_load_distribution(self, path)

    def plot_rpv_histogram(self, path=None):
        from moebuild.tracing.plots import plot_rpv_histogram

        return plot_rpv_histogram(self, path)

    def plot_patch_maps(self, images=None, layer: int | None = None, paths=None):
        from moebuild.tracing.plots import plot_patch_maps

        return plot_patch_maps(self, images, layer, paths)

    def plot_coactivation(self, path=None):
        from moebuild.tracing.plots import plot_coactivation

        return plot_coactivation(self, path)


def _image_runs(ids_S: Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive image tokens."""
    is_image = (ids_S == image_token_id).tolist()
    runs, start = [], None
    for i, flag in enumerate([*is_image, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


@torch.no_grad()
def trace(model, batch: dict, into: RoutingTrace | None = None) -> RoutingTrace:
    """Run `model` on `batch` (the keyword arguments of its forward: input_ids, pixel_values,
    attention_mask, ...) in eval mode without a cache, and add its routing to `into` (a new
    trace when None). Image tokens are found as runs of the model's image_token_id, one run per
    image, in batch order."""
    result = into if into is not None else RoutingTrace(model_name=getattr(getattr(model, "spec", None), "name", ""))
    recorder = Recorder(model, result)
    was_training = model.training
    model.eval()
    try:
        with recorder.record():
            model(**batch, use_cache=False)
    finally:
        model.train(was_training)
    result.batches += 1
    image_token_id = getattr(model.config, "image_token_id", None)
    input_ids = batch.get("input_ids")
    if image_token_id is None or input_ids is None or batch.get("pixel_values") is None:
        return result
    B, S = input_ids.shape
    for b in range(B):
        for start, length in _image_runs(input_ids[b], image_token_id):
            image = ImageTrace(len(result.images), length)
            for (layer, route), top1_T in recorder.calls.items():
                image.top1.setdefault(layer, {})[route] = top1_T.view(B, S)[b, start:start + length].tolist()
            result.images.append(image)
    return result
