"""Figures of a `RoutingTrace` (matplotlib, Agg backend: no display needed).

Each `plot_*` takes the trace and returns a matplotlib Figure (saved to `path` when given):
expert-load heatmap and sorted load distribution per modality, RPV histogram of image vs text
tokens with LTDR's tail threshold, per-image patch maps of the top-1 expert of one layer, and the
expert co-activation graph of every layer (networkx spring layout). A route without a top-1
(dense, soft) is labelled as such.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MODALITIES = ("text", "image")


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
        plt.close(fig)
    return fig


def _rows(trace, modality: str):
    """(label, load share [E] or None, kind) per layer and route covering `modality`."""
    rows = []
    for index in trace.layer_indices():
        for name, route in trace.layers[index].routes.items():
            counts = route.groups.get(modality)
            if counts is None:
                continue
            total = int(counts.load.sum())
            share = counts.load.double().numpy() / total if total else np.zeros(route.num_experts)
            label = f"L{index} {name}" + ("" if route.kind == "top1" else f" ({route.kind})")
            rows.append((label, share, route.kind))
    return rows


def plot_load_heatmap(trace, path=None):
    """Share of each expert in the kept assignments, layers (and routes) x experts, per modality."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.6 + 0.35 * max(len(trace.layers), 1) * 2), squeeze=False)
    for ax, modality in zip(axes[0], MODALITIES):
        rows = _rows(trace, modality)
        if not rows:
            ax.text(0.5, 0.5, f"no route takes {modality} tokens", ha="center", va="center")
            ax.set_axis_off()
            continue
        E = max(len(share) for _, share, _ in rows)
        grid = np.full((len(rows), E), np.nan)
        for i, (_, share, _) in enumerate(rows):
            grid[i, : len(share)] = share
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=7)
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_title(f"{modality} tokens: expert load share")
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _finish(fig, path)


def plot_load_distribution(trace, path=None):
    """Each layer's expert loads sorted high to low, per modality: a long tail falls steeply."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False, sharey=True)
    for ax, modality in zip(axes[0], MODALITIES):
        rows = _rows(trace, modality)
        for label, share, kind in rows:
            ax.plot(range(1, len(share) + 1), np.sort(share)[::-1], marker="o", ms=3, label=label,
                    linestyle="-" if kind == "top1" else ":")
        if rows:
            E = max(len(share) for _, share, _ in rows)
            ax.axhline(1 / E, color="grey", linestyle="--", linewidth=0.8, label="uniform")
            ax.set_xticks(range(1, E + 1))
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, f"no route takes {modality} tokens", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("expert rank")
        ax.set_title(f"{modality} tokens: sorted expert load")
    axes[0][0].set_ylabel("share of assignments")
    return _finish(fig, path)


def plot_rpv_histogram(trace, path=None):
    """Routing-probability variance of text vs image tokens per layer, LTDR's tail threshold marked."""
    layers = [i for i in trace.layer_indices()
              if any(len(c.rpv) for r in trace.layers[i].routes.values() for c in r.groups.values())]
    n = max(len(layers), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False)
    if not layers:
        axes[0][0].text(0.5, 0.5, "no router has scores (RPV)", ha="center", va="center")
        axes[0][0].set_axis_off()
        return _finish(fig, path)
    for ax, index in zip(axes[0], layers):
        routes = trace.layers[index].routes.values()
        for modality, colour in zip(MODALITIES, ("tab:blue", "tab:orange")):
            summaries = [r.groups[modality].rpv for r in routes if modality in r.groups and len(r.groups[modality].rpv)]
            if summaries:  # a route's sample stands for all its tokens: each value weighs tokens / sample
                samples = [s.sample().numpy() for s in summaries]
                weights = [np.full(len(v), len(s) / len(v)) for s, v in zip(summaries, samples)]
                tokens = sum(len(s) for s in summaries)
                ax.hist(np.concatenate(samples), bins=30, weights=np.concatenate(weights), alpha=0.55, color=colour,
                        label=f"{modality} ({tokens})", density=True)
        for r in routes:
            threshold = r.tail_threshold
            if threshold is not None and any(c.has_tail for c in r.groups.values()):
                ax.axvline(threshold, color="red", linestyle="--", label=f"tail threshold ({r.name})")
            elif threshold is not None and r.tokens in ("all", "image"):
                ax.axvline(threshold, color="grey", linestyle=":", label=f"mean RPV ({r.name})")
        ax.set_title(f"layer {index}: RPV")
        ax.set_xlabel("variance of routing probabilities")
        ax.legend(fontsize=6)
    return _finish(fig, path)


def _image_route(trace, layer: int) -> str | None:
    """The route whose top-1 a patch map shows: the first top-1 route covering image tokens."""
    for name, route in trace.layers[layer].routes.items():
        if route.kind == "top1" and route.tokens in ("all", "image"):
            return name
    return None


def plot_patch_maps(trace, images=None, layer: int | None = None, paths=None):
    """One figure per traced image: the top-1 expert of each patch at `layer` (default: the first
    MoE layer) over the picture (`images`: PIL images or arrays in trace order). Returns figures."""
    layer = trace.layer_indices()[0] if layer is None else layer
    if layer not in trace.layers:
        raise ValueError(f"layer {layer} is not an MoE layer; choose from {trace.layer_indices()}")
    route = _image_route(trace, layer)
    E = max(r.num_experts for r in trace.layers[layer].routes.values())
    cmap = plt.get_cmap("tab10" if E <= 10 else "tab20", E)
    figures = []
    for i, image_trace in enumerate(trace.images):
        fig, ax = plt.subplots(figsize=(3.8, 3.4))
        picture = None if images is None else np.asarray(images[i].convert("RGB") if hasattr(images[i], "convert")
                                                         else images[i])
        n = image_trace.num_tokens
        side = math.ceil(math.sqrt(n))
        height, width = (picture.shape[0], picture.shape[1]) if picture is not None else (side, side)
        if picture is not None:
            ax.imshow(picture, extent=(0, width, height, 0))
        if route is None:
            kinds = ", ".join(sorted({r.kind for r in trace.layers[layer].routes.values()}))
            ax.set_title(f"image {i}, layer {layer}: no top-1 ({kinds})", fontsize=8)
        else:
            top1 = np.full(side * side, -1.0)
            top1[:n] = image_trace.top1[layer][route]
            grid = np.ma.masked_less(top1.reshape(side, side), 0)
            shown = ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=E - 0.5, alpha=0.55, extent=(0, width, height, 0),
                              interpolation="nearest")
            fig.colorbar(shown, ax=ax, ticks=range(E), fraction=0.046, label="top-1 expert")
            ax.set_title(f"image {i}, layer {layer}, route {route}", fontsize=8)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
        figures.append(_finish(fig, None if paths is None else paths[i]))
    return figures


def plot_coactivation(trace, path=None):
    """Per layer, experts as nodes (area ~ load) linked by how many tokens kept both (width ~ count)."""
    import networkx as nx

    layers = trace.layer_indices()
    n = max(len(layers), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.4), squeeze=False)
    for ax, index in zip(axes[0], layers):
        E = max(r.num_experts for r in trace.layers[index].routes.values())
        co = np.zeros((E, E))
        for r in trace.layers[index].routes.values():
            m = r.groups["all"].coactivation.numpy()
            co[: m.shape[0], : m.shape[1]] += m
        graph = nx.Graph()
        graph.add_nodes_from(range(E))
        for a in range(E):
            for b in range(a + 1, E):
                if co[a, b] > 0:
                    graph.add_edge(a, b, weight=float(co[a, b]))
        pos = nx.spring_layout(graph, weight="weight", seed=0)
        load = np.diag(co)
        widths = [0.5 + 4 * d["weight"] / max(co.max(), 1) for _, _, d in graph.edges(data=True)]
        nx.draw_networkx_edges(graph, pos, ax=ax, width=widths, alpha=0.5)
        nx.draw_networkx_nodes(graph, pos, ax=ax, node_size=100 + 900 * load / max(load.max(), 1),
                               node_color="tab:green")
        nx.draw_networkx_labels(graph, pos, ax=ax, font_size=7)
        kinds = {r.kind for r in trace.layers[index].routes.values()} - {"top1"}
        ax.set_title(f"layer {index} co-activation" + (f" ({', '.join(sorted(kinds))})" if kinds else ""), fontsize=9)
        ax.set_axis_off()
    return _finish(fig, path)
