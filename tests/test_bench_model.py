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
        "w": (1, lambda model: model)})  # the "run" is the model itself: records who was sampled
    spec = moebuild.load_spec(str(SPECS / "qwen2_moe_like.yaml"), overrides=TINY)
    monkeypatch.setattr(bench_model, "check_logits", lambda *a, **k: 0.0)
    bench_model.bench_model(spec, repeats=4)
    ours = order[0]
    assert [run is ours for run in order] == [True, False, False, True, True, False, False, True]


def _refusal(args):
    result = CliRunner().invoke(main, ["bench", "model", str(SPECS / "qwen2_moe_like.yaml"), *args,
                                       *[a for o in TINY for a in ("--set", o)]])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return result.output.strip().splitlines()[-1]


@pytest.mark.parametrize(("args", "says"), [
    (["--set", "language.max_position_embeddings=32", "--length", "40"],
     "Invalid value for --length: 40 exceeds the model's 32 positions (language.max_position_embeddings)"),
    (["--only", "nothing"],
     "Invalid value for --only: 'nothing' matches no workload; expected part of one of: train step 4 x 512, "
     "prefill 1 x 128, prefill 1 x 512, generate 128 + 32 greedy, prompt 128 + 1 token"),
    (["--only", "prefill", "--only", "prefll"], "Invalid value for --only: 'prefll' matches no workload; expected "
     "part of one of: train step 4 x 512, prefill 1 x 128, prefill 1 x 512, generate 128 + 32 greedy, "
     "prompt 128 + 1 token; did you mean 'prefill'?"),
], ids=["length-past-positions", "only-unknown", "only-misspelt"])
def test_a_length_past_the_positions_or_an_only_matching_nothing_is_refused(args, says):
    assert _refusal(args) == f"Error: {says}"


def test_workloads_past_a_short_models_positions_are_skipped_rows(monkeypatch):
    from moebuild import bench_model

    monkeypatch.setattr(bench_model, "MIN_SAMPLE_S", 0.0)
    lengths = []
    check = bench_model.check_logits
    monkeypatch.setattr(bench_model, "check_logits", lambda *a, **k: lengths.append(k["length"]) or check(*a, **k))
    args = ["bench", "model", str(SPECS / "qwen2_moe_like.yaml"), "--set", "language.max_position_embeddings=48",
            "--batch", "1", "--length", "16", "--repeats", "1", "--only", "train", "--only", "prefill", "--json"]
    result = CliRunner().invoke(main, args + [a for o in TINY for a in ("--set", o)])
    assert result.exit_code == 0, result.output
    rows = {r["workload"]: r for r in json.loads(result.output)["rows"]}
    assert rows["train step 1 x 16"]["skipped"] is None and rows["train step 1 x 16"]["moebuild_ms"] > 0
    for n in (128, 512):
        assert rows[f"prefill 1 x {n}"] == {
            "workload": f"prefill 1 x {n}", "moebuild_ms": None, "transformers_ms": None, "moebuild_spread_ms": None,
            "transformers_spread_ms": None, "ratio": None,
            "skipped": f"needs {n} positions, the model has 48 (language.max_position_embeddings)"}
    assert lengths == [48]  # the logits check stays within the positions too
