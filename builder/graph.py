"""The routing graph of a spec, drawn: token groups -> routers -> expert pools, balancing terms.

Read from the spec alone (no torch): `routing_graph(spec)` gives nodes and edges, then
`to_dot` writes Graphviz DOT, `to_svg` a hand-laid SVG, and `write_png` the same layout through
Pillow. One MoE section applies to every MoE layer, so one graph is drawn, titled with the
decoder layers it covers. A balancing term is linked (dashed) to every routed, non-dense route
whose tokens it can see -- the rule of the spec's own balancing check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from moebuild.schemas import ModelSpec

TOKEN_LABELS = {"all": "all tokens", "text": "text tokens", "image": "image tokens"}
COLUMNS = ("tokens", "router", "pool", "balancing")
FILL = {"tokens": "#e8f0fe", "router": "#fff4e0", "pool": "#e6f4ea", "balancing": "#f3e8fd"}
FORMATS = (".svg", ".png", ".dot", ".gv")


@dataclass
class Node:
    id: str
    kind: str  # one of COLUMNS
    lines: list[str]


@dataclass
class Edge:
    source: str
    target: str
    dashed: bool = False


@dataclass
class RoutingGraph:
    title: str
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)


def _describe(node, skip: str | None = None) -> list[str]:
    """A spec node as lines: its type, then every key set away from its default."""
    data = node.model_dump(mode="json", exclude_defaults=True, exclude={skip} if skip else None)
    kind = data.pop("type", type(node).__name__)
    return [str(kind), *(f"{key}: {_compact(value)}" for key, value in data.items())]


def _compact(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_compact(v)}" for k, v in value.items()) + "}"
    return str(value)


def routing_graph(spec: ModelSpec) -> RoutingGraph:
    moe = spec.moe
    if moe is None:
        raise ValueError(f"{spec.name} is a dense model: it has no moe section to draw")
    layers = spec.moe_layers()
    graph = RoutingGraph(f"{spec.name}: MoE in decoder layers {layers} of {spec.language.num_layers}")
    for tokens in dict.fromkeys(route.tokens for route in moe.routes):
        graph.nodes.append(Node(f"tokens_{tokens}", "tokens", [TOKEN_LABELS[tokens]]))
    for i, route in enumerate(moe.routes):
        graph.nodes.append(Node(f"router_{i}", "router", _describe(route.router)))
        graph.edges += [Edge(f"tokens_{route.tokens}", f"router_{i}"), Edge(f"router_{i}", f"pool_{route.pool}")]
    for name, pool in moe.pools.items():
        graph.nodes.append(Node(f"pool_{name}", "pool", [name, f"{pool.num_experts} experts x {pool.intermediate_size}"]))
    for j, term in enumerate(moe.balancing):
        scope = getattr(term, "tokens", "all")
        lines = [*_describe(term, skip="tokens"), f"over {TOKEN_LABELS[scope]}"]
        graph.nodes.append(Node(f"balance_{j}", "balancing", lines))
        graph.edges += [
            Edge(f"balance_{j}", f"router_{i}", dashed=True)
            for i, route in enumerate(moe.routes)
            if route.router.type != "dense" and (scope == "all" or route.tokens in (scope, "all"))
        ]
    return graph


def to_dot(graph: RoutingGraph) -> str:
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = ["digraph routing {", "  rankdir=LR;", f"  label={quote(graph.title)};", "  labelloc=t;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for node in graph.nodes:
        label = quote("\n".join(node.lines)).replace("\n", "\\n")
        out.append(f"  {quote(node.id)} [label={label}, fillcolor={quote(FILL[node.kind])}];")
    for edge in graph.edges:  # ids quoted: a pool's name is any YAML key (routed-experts, p"q)
        style = " [style=dashed, arrowhead=none, constraint=false]" if edge.dashed else ""
        out.append(f"  {quote(edge.source)} -> {quote(edge.target)}{style};")
    return "\n".join(out + ["}"]) + "\n"


# Layout for SVG and PNG: one column per node kind, boxes sized from their text.
CHAR_W, LINE_H, PAD, GAP_X, GAP_Y, TOP, LANE_STEP = 7, 16, 8, 60, 18, 40, 4


@dataclass
class Box:
    x: int
    y: int
    w: int
    h: int


def layout(graph: RoutingGraph) -> tuple[dict[str, Box], int, int]:
    """Boxes per node id and the canvas size."""
    columns = [[n for n in graph.nodes if n.kind == kind] for kind in COLUMNS]
    columns = [col for col in columns if col]
    widths = [max(len(line) for n in col for line in n.lines) * CHAR_W + 2 * PAD for col in columns]
    heights = [[len(n.lines) * LINE_H + 2 * PAD for n in col] for col in columns]
    total_h = max(sum(h) + GAP_Y * (len(h) - 1) for h in heights)
    boxes, x = {}, PAD * 2
    for col, width, col_h in zip(columns, widths, heights):
        y = TOP + (total_h - (sum(col_h) + GAP_Y * (len(col_h) - 1))) // 2
        for node, h in zip(col, col_h):
            boxes[node.id] = Box(x, y, width, h)
            y += h + GAP_Y
        x += width + GAP_X
    return boxes, x - GAP_X + PAD * 2, TOP + total_h + PAD * 2


def edge_paths(graph: RoutingGraph, boxes: dict[str, Box]) -> list[list[tuple[int, int]]]:
    """The points of each edge's line, in graph.edges' order. A solid edge joins neighbouring
    columns straight. A dashed one (balancing term -> router) crosses the pool column, so it runs
    right-angled: out of the router, along the nearest horizontal lane free of pool boxes (its own
    height when that is free), and into the term's left side, never through a box; a second edge on
    the same lane runs LANE_STEP px beside the first, so each link can be followed."""
    pools = [box for node_id, box in boxes.items() if node_id.startswith("pool_")]
    on_lane: dict[int, int] = {}
    paths = []
    for edge in graph.edges:
        a, b = boxes[edge.source], boxes[edge.target]
        if not edge.dashed:
            paths.append([(a.x + a.w, a.y + a.h // 2), (b.x, b.y + b.h // 2)])
            continue
        router, term = b, a
        start, end = (router.x + router.w, router.y + router.h // 2), (term.x, term.y + term.h // 2)
        if not pools:
            paths.append([start, end])
            continue
        lane, shift = _free_lane(start[1], end[1], pools), 0
        if lane != start[1]:  # a lane other edges may share
            # at most as far as the lane's margin to the boxes (GAP_Y / 2); past that, lines overlap
            shift = LANE_STEP * min(on_lane.get(lane, 0), GAP_Y // 2 // LANE_STEP)
            on_lane[lane] = on_lane.get(lane, 0) + 1
        left, right = router.x + router.w + GAP_X // 2 - shift, term.x - GAP_X // 2 + shift
        points = [start, (left, start[1]), (left, lane + shift), (right, lane + shift), (right, end[1]), end]
        paths.append([p for k, p in enumerate(points) if k == 0 or p != points[k - 1]])
    return paths


def _free_lane(y_from: int, y_to: int, pools: list[Box]) -> int:
    """The height nearest the middle of y_from and y_to that meets no pool box (with GAP_Y / 2 to
    spare): y_from itself when free, else above, between or below the pools."""
    if not any(box.y - GAP_Y // 2 < y_from < box.y + box.h + GAP_Y // 2 for box in pools):
        return y_from
    ordered = sorted(pools, key=lambda box: box.y)
    lanes = [ordered[0].y - GAP_Y // 2, ordered[-1].y + ordered[-1].h + GAP_Y // 2]
    lanes += [(upper.y + upper.h + lower.y) // 2 for upper, lower in zip(ordered, ordered[1:])]
    middle = (y_from + y_to) / 2
    return min(lanes, key=lambda y: abs(y - middle))


def to_svg(graph: RoutingGraph) -> str:
    boxes, width, height = layout(graph)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{PAD * 2}" y="{TOP // 2 + 4}" font-weight="bold">{escape(graph.title)}</text>',
    ]
    for edge, path in zip(graph.edges, edge_paths(graph, boxes)):
        points = " ".join(f"{x},{y}" for x, y in path)
        style = 'stroke-dasharray="5,4"' if edge.dashed else 'marker-end="url(#arrow)"'
        out.append(f'<polyline points="{points}" fill="none" stroke="#555" {style}/>')
    for node in graph.nodes:
        b = boxes[node.id]
        out.append(f'<g id="{escape(node.id)}"><rect x="{b.x}" y="{b.y}" width="{b.w}" height="{b.h}" rx="6" '
                   f'fill="{FILL[node.kind]}" stroke="#333"/>')
        for k, line in enumerate(node.lines):
            out.append(f'<text x="{b.x + PAD}" y="{b.y + PAD + (k + 1) * LINE_H - 4}">{escape(line)}</text>')
        out.append("</g>")
    return "\n".join(out + ["</svg>"]) + "\n"


def write_png(graph: RoutingGraph, path: Path) -> None:
    from PIL import Image, ImageDraw

    boxes, width, height = layout(graph)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD * 2, TOP // 2 - 6), graph.title, fill="black")
    for edge, points in zip(graph.edges, edge_paths(graph, boxes)):
        if edge.dashed:
            for (x1, y1), (x2, y2) in zip(points, points[1:]):
                steps = max(abs(x2 - x1), abs(y2 - y1)) // 9 + 1
                for s in range(0, steps, 2):
                    t0, t1 = s / steps, min(s + 1, steps) / steps
                    draw.line([(x1 + (x2 - x1) * t0, y1 + (y2 - y1) * t0),
                               (x1 + (x2 - x1) * t1, y1 + (y2 - y1) * t1)], fill="#555")
        else:
            (x1, y1), (x2, y2) = points
            draw.line([(x1, y1), (x2, y2)], fill="#555")
            draw.polygon([(x2, y2), (x2 - 8, y2 - 4), (x2 - 8, y2 + 4)], fill="#555")
    for node in graph.nodes:
        b = boxes[node.id]
        draw.rounded_rectangle([b.x, b.y, b.x + b.w, b.y + b.h], radius=6, fill=FILL[node.kind], outline="#333")
        for k, line in enumerate(node.lines):
            draw.text((b.x + PAD, b.y + PAD + k * LINE_H + 2), line, fill="black")
    image.save(path)


def write_graph(spec: ModelSpec, path: Path) -> None:
    """Draw `spec`'s routing graph to `path`; the format is the extension (FORMATS)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unknown graph format {path.suffix!r} for {path}; use one of {', '.join(FORMATS)}")
    graph = routing_graph(spec)
    if suffix == ".png":
        write_png(graph, path)
    else:
        path.write_text(to_svg(graph) if suffix == ".svg" else to_dot(graph))
