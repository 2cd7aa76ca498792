"""`moebuild graph`: the routing graph of the micro presets as DOT, SVG and PNG, from the spec alone."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

import moebuild
from moebuild.cli import main
from moebuild.graph import edge_paths, layout, routing_graph, to_dot
from moebuild.schemas import ModelSpec


def dot_of(name: str, *overrides: str) -> str:
    return to_dot(routing_graph(moebuild.load_spec(name, list(overrides))))


def edges(dot: str) -> set[tuple[str, str, bool]]:
    return {(a, b, "dashed" in rest) for a, b, rest in re.findall(r'^  "(.+?)" -> "(.+?)"(.*);$', dot, re.M)}


def labels(dot: str) -> dict[str, str]:
    return dict(re.findall(r'^  "(.+?)" \[label="(.*?)", fillcolor', dot, re.M))


def test_micro_moe_llava():
    dot = dot_of("micro-moe-llava")
    assert 'label="micro-moe-llava: MoE in decoder layers [0, 2] of 4"' in dot
    assert labels(dot) == {
        "tokens_all": "all tokens",
        "router_0": r"deepspeed_top2\ncapacity: {train: 1.5, eval: 2.0}",
        "pool_experts": r"experts\n4 experts x 256",
        "balance_0": r"switch_aux\ncoef: 0.01\nover all tokens",
    }
    assert edges(dot) == {("tokens_all", "router_0", False), ("router_0", "pool_experts", False),
                          ("balance_0", "router_0", True)}


def test_micro_deepseek_vl2_dense_shared_route_is_not_balanced():
    dot = dot_of("micro-deepseek-vl2")
    assert labels(dot)["router_0"] == "dense" and labels(dot)["pool_routed"] == r"routed\n16 experts x 64"
    assert edges(dot) == {
        ("tokens_all", "router_0", False), ("router_0", "pool_shared", False),
        ("tokens_all", "router_1", False), ("router_1", "pool_routed", False),
        ("balance_0", "router_1", True),
    }


def test_micro_ltdr_balance_covers_the_text_route_only():
    dot = dot_of("micro-ltdr")
    assert labels(dot)["balance_0"] == r"load_balance\ncoef: 0.01\nover text tokens"
    assert edges(dot) == {
        ("tokens_text", "router_0", False), ("router_0", "pool_experts", False),
        ("tokens_image", "router_1", False), ("router_1", "pool_experts", False),
        ("balance_0", "router_0", True),
    }


def test_hierarchical_router_shows_its_groups():
    dot = dot_of("micro-moe-llava", "moe.routes.0.router={type: hierarchical, groups: {image: 2, text: 2}, top_k: 1}")
    assert labels(dot)["router_0"] == r"hierarchical\ngroups: {image: 2, text: 2}"


def test_cli_writes_svg_that_parses_and_png_and_dot(tmp_path):
    runner = CliRunner()
    for suffix in (".svg", ".png", ".dot"):
        out = tmp_path / f"g{suffix}"
        result = runner.invoke(main, ["graph", "micro-ltdr", "-o", str(out)])
        assert result.exit_code == 0, result.output
    root = ET.parse(tmp_path / "g.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    groups = {g.get("id") for g in root.iter("{http://www.w3.org/2000/svg}g")}
    assert groups == {"tokens_text", "tokens_image", "router_0", "router_1", "pool_experts", "balance_0"}
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "g.dot").read_text() == dot_of("micro-ltdr")


def test_an_existing_drawing_or_the_spec_itself_is_not_overwritten(tmp_path):
    out = tmp_path / "routing.svg"
    out.write_text("mine")
    result = CliRunner().invoke(main, ["graph", "micro-ltdr", "-o", str(out)])
    assert result.exit_code == 1 and "routing.svg exists (--force replaces it)" in result.output
    assert out.read_text() == "mine"
    spec = tmp_path / "spec.dot"  # a YAML spec whose name happens to end in a drawing's extension
    spec.write_text("base: micro-ltdr\n")
    result = CliRunner().invoke(main, ["graph", str(spec), "-o", str(spec), "--force"])
    assert result.exit_code == 1 and "it is the input" in result.output
    assert spec.read_text() == "base: micro-ltdr\n"


def test_pool_names_that_are_not_identifiers_give_valid_dot():
    dot = dot_of("micro-ltdr", "~moe.pools.experts", "+moe.pools.routed-experts={num_experts: 4, intermediate_size: 64}",
                 "moe.routes.0.pool=routed-experts", "moe.routes.1.pool=routed-experts")
    assert ("router_0", "pool_routed-experts", False) in edges(dot)
    assert '  "pool_routed-experts" [label="routed-experts\\n4 experts x 64"' in dot


def test_bad_extension_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["graph", "micro-ltdr", "-o", str(tmp_path / "g.jpg")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: cannot draw to {tmp_path / 'g.jpg'}: the extension must be one of .svg, .png, .dot, .gv"
    ]
    assert not (tmp_path / "g.jpg").exists()


def test_graph_does_not_import_torch(tmp_path):
    probe = (
        "import sys\nfrom moebuild.cli import main\n"
        f"try:\n    main(['graph', 'micro-deepseek-vl2', '-o', {str(tmp_path / 'g.svg')!r}])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "HEAVY []" in proc.stdout.splitlines(), proc.stderr[-2000:]
    assert (tmp_path / "g.svg").exists()


def test_help_has_examples():
    assert "Example" in CliRunner().invoke(main, ["graph", "--help"]).output


@pytest.mark.parametrize("name", moebuild.list_presets())
def test_every_preset_draws(name):
    graph = routing_graph(moebuild.load_spec(name))
    ids = {node.id for node in graph.nodes}
    assert all(edge.source in ids and edge.target in ids for edge in graph.edges)


@pytest.mark.parametrize("name", moebuild.list_presets())
def test_no_edge_runs_through_a_box(name):
    """Every point of every drawn edge lies outside every box but its own two ends' (the balancing
    edges once ran straight through the pools)."""
    graph = routing_graph(moebuild.load_spec(name))
    boxes, _, _ = layout(graph)
    for edge, points in zip(graph.edges, edge_paths(graph, boxes)):
        others = [box for node_id, box in boxes.items() if node_id not in (edge.source, edge.target)]
        for (x1, y1), (x2, y2) in zip(points, points[1:]):
            steps = max(abs(x2 - x1), abs(y2 - y1), 1)
            for k in range(steps + 1):
                x, y = x1 + (x2 - x1) * k / steps, y1 + (y2 - y1) * k / steps
                inside = [b for b in others if b.x <= x <= b.x + b.w and b.y <= y <= b.y + b.h]
                assert not inside, f"{edge.source} -> {edge.target} passes through a box at ({x:.0f}, {y:.0f})"


def _segments(points):
    return [((x1, y1), (x2, y2)) for (x1, y1), (x2, y2) in zip(points, points[1:])]


def _overlap(s, t) -> bool:
    """Two axis-parallel segments on one line sharing more than a point."""
    (a1, a2), (b1, b2) = s, t
    for axis in (0, 1):
        other = 1 - axis
        if a1[other] == a2[other] == b1[other] == b2[other]:
            lo, hi = max(min(a1[axis], a2[axis]), min(b1[axis], b2[axis])), min(max(a1[axis], a2[axis]), max(b1[axis], b2[axis]))
            if hi > lo:
                return True
    return False


def test_balancing_links_on_one_lane_run_side_by_side():
    """Two routed routes, each with its own term and one over all tokens: four dashed links, two of
    which would share the lanes above and below the pools; no two links of different routers and
    different terms may run along the same line."""
    data = moebuild.load_spec("micro-vl-moe").model_dump(mode="json", exclude_defaults=True)
    data["moe"]["balancing"].append({"type": "z_loss", "coef": 0.001})
    spec = ModelSpec.model_validate(data)
    graph = routing_graph(spec)
    boxes, _, _ = layout(graph)
    dashed = [(e, p) for e, p in zip(graph.edges, edge_paths(graph, boxes)) if e.dashed]
    assert len(dashed) == 4
    for i, (e, p) in enumerate(dashed):
        for f, q in dashed[i + 1:]:
            if e.source != f.source and e.target != f.target:
                assert not any(_overlap(s, t) for s in _segments(p) for t in _segments(q)), (e, f)
