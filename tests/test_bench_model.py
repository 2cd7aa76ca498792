"""`moebuild bench model` at tiny sizes: both models run every workload on the same weights and the
report is consistent (timings are not checked)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moebuild.cli import main

SPECS = Path(__file__).resolve().parents[1] / "benchmarks" / "specs"
TINY = ["language.hidden_size=64", "language.num_heads=4", "language.intermediate_size=96", "language.vocab_size=256",
        "language.num_layers=2", "moe.pools.experts.intermediate_size=32", "moe.pools.shared.intermediate_size=32"]


@pytest.mark.parametrize("name", ["qwen2_moe_like", "deepseek_v3_like"])
def test_every_workload_runs_on_both_models(name, monkeypatch):
    monkeypatch.setattr("moebuild.bench_model.MIN_SAMPLE_S", 0.0)
    args = ["bench", "model", str(SPECS / f"{name}.yaml"), "--batch", "1", "--length", "16", "--repeats", "1", "--json"]
    result = CliRunner().invoke(main, args + [a for o in TINY for a in ("--set", o)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["logits_rel_diff"] <= 1e-4
    assert [r["workload"] for r in report["rows"]] == ["train step 1 x 16", "prefill 1 x 128", "prefill 1 x 512",
                                                       "generate 128 + 32 greedy", "prompt 128 + 1 token"]
    for row in report["rows"]:
        assert row["moebuild_ms"] > 0 and row["ratio"] == pytest.approx(row["moebuild_ms"] / row["transformers_ms"])


def test_a_spec_transformers_has_no_model_for_is_one_line():
    result = CliRunner().invoke(main, ["bench", "model", "micro-moe-llava"])
    assert result.exit_code == 1 and "vision tower" in result.output and len(result.output.strip().splitlines()) == 1


def test_samples_alternate_which_model_goes_first(monkeypatch):
    import moebuild
    from moebuild import bench_model

    order = []
    monkeypatch.setattr(bench_model, "_sample_ms", lambda run: order.append(run) or 1.0)
    monkeypatch.setattr(bench_model, "workloads", lambda vocab, batch, length: {
        "w": lambda model: model})  # the "run" is the model itself: records who was sampled
    spec = moebuild.load_spec(str(SPECS / "qwen2_moe_like.yaml"), overrides=TINY)
    monkeypatch.setattr(bench_model, "check_logits", lambda *a: 0.0)
    bench_model.bench_model(spec, repeats=4)
    ours = order[0]
    assert [run is ours for run in order] == [True, False, False, True, True, False, False, True]
