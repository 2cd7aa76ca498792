"""`moebuild bench moe` at tiny sizes: the JSON carries consistent values (timings are not checked)."""

import json

import pytest
import torch
from click.testing import CliRunner

from moebuild.bench import time_layers
from moebuild.cli import main

# Two repeats, so the second (reversed-order) round of time_layers runs too.
ARGS = ["bench", "moe", "--experts", "4", "--top-k", "2", "--hidden", "32", "--intermediate", "16",
        "--shared-experts", "8", "--tokens", "1", "--tokens", "5", "--backward", "--repeats", "2", "--json"]


@pytest.fixture(scope="module")
def report():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("moebuild.bench.MIN_SAMPLE_S", 0.0)  # one call per sample: values, not timings
        result = CliRunner().invoke(main, ARGS)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_every_implementation_at_every_token_count(report):
    impls = {"moebuild eager", "moebuild torch", "transformers eager", "transformers batched_mm",
             "transformers grouped_mm", "dense"}
    assert {(r["impl"], r["tokens"]) for r in report["results"]} == {(i, t) for i in impls for t in (1, 5)}
    assert report["config"] == {"experts": 4, "top_k": 2, "hidden": 32, "intermediate": 16, "shared": 8,
                                "dense_width": 2 * 16 + 8}
    assert report["dtype"] == "float32" and report["device"] == "cpu"


def test_outputs_agree_and_ratios_are_consistent(report):
    rows = {(r["impl"], r["tokens"]): r for r in report["results"]}
    for (impl, tokens), r in rows.items():
        dense = rows["dense", tokens]
        assert r["forward_vs_dense"] == pytest.approx(r["forward_ms"] / dense["forward_ms"])
        assert r["forward_backward_vs_dense"] == pytest.approx(r["forward_backward_ms"] / dense["forward_backward_ms"])
        assert r["forward_tokens_per_s"] == pytest.approx(tokens / r["forward_ms"] * 1e3)
        if impl == "dense":
            assert r["max_abs_diff"] is None
        else:
            assert r["max_abs_diff"] <= 1e-5, impl


def test_top_k_above_experts_is_a_usage_error():
    result = CliRunner().invoke(main, ["bench", "moe", "--experts", "2", "--top-k", "3"])
    assert result.exit_code == 2 and "--top-k 3 exceeds --experts 2" in result.output


def test_each_transformers_row_runs_its_own_implementation(monkeypatch):
    """transformers picks the implementation from the config at every call: the layers must not share one."""
    import torch
    from transformers.integrations import moe

    from moebuild.bench import MoEConfig, build_layers, fixed_routing

    calls = []
    mapping = moe.ALL_EXPERTS_FUNCTIONS._global_mapping
    for name in ("batched_mm", "grouped_mm"):
        def recorded(*args, _name=name, _fn=mapping[name], **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setitem(mapping, name, recorded)
    cfg = MoEConfig(experts=4, top_k=2, hidden=32, intermediate=16)
    layers = build_layers(cfg, torch.device("cpu"), torch.float32)
    weights_TK, ids_TK = fixed_routing(5, cfg, torch.device("cpu"))
    for impl in ("eager", "batched_mm", "grouped_mm"):
        calls.clear()
        layers[f"transformers {impl}"][0](torch.randn(5, 32), weights_TK, ids_TK)
        assert calls == ([] if impl == "eager" else [impl])


def test_every_timed_call_follows_an_untimed_call_of_the_same_layer(monkeypatch):
    """`time_layers` never times a layer's first call after another layer (the cost of the memory
    that one freed would be charged to it); rounds alternate the order."""
    monkeypatch.setattr("moebuild.bench.MIN_SAMPLE_S", 0.0)
    log = []

    def layer(name):
        return lambda x_TD, weights_TK, ids_TK: log.append(name) or x_TD.sum()

    x_TD, weights_TK, ids_TK = torch.ones(2, 3), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)
    time_layers({"a": (layer("a"), []), "b": (layer("b"), [])}, x_TD, weights_TK, ids_TK, backward=False, repeats=2)
    assert log == ["a", "a", "b", "b", "b", "b", "a", "a"]


TINY = ["bench", "moe", "--experts", "4", "--top-k", "2", "--hidden", "32", "--intermediate", "16", "--tokens", "3",
        "--repeats", "1"]
MOE_NAMES = ("moebuild eager, moebuild torch, moebuild triton, transformers eager, transformers batched_mm, "
             "transformers grouped_mm")


@pytest.mark.parametrize(("args", "says"), [
    (["--skip", "nonsense"], f"--skip: 'nonsense' is no implementation; expected one of: {MOE_NAMES}"),
    (["--skip", "moebuild eager", "--skip", "grouped_mm"],
     f"--skip: 'grouped_mm' is no implementation; expected one of: {MOE_NAMES}; did you mean 'transformers grouped_mm'?"),
    (["--skip", "eager"], f"--skip: 'eager' is no implementation; expected one of: {MOE_NAMES}; "
                          "did you mean 'moebuild eager' or 'transformers eager'?"),
    (["--skip", "dense"], "--skip: 'dense' cannot be skipped: every 'x dense' ratio is against it"),
    (["--device", "gpu"], "--device: 'gpu' is not a torch device; expected cpu, cuda or cuda:N; did you mean 'cuda'?"),
    (["--device", "nonsense"], "--device: 'nonsense' is not a torch device; expected cpu, cuda or cuda:N"),
    (["--device", "meta"],
     "--device: 'meta' tensors hold no data, so nothing runs there to time; expected cpu, cuda or cuda:N"),
    (["--device", "xpu"], "--device: 'xpu': only cpu and cuda can be timed here (cuda is the one device "
                          "synchronised); expected cpu, cuda or cuda:N"),
    (["--device", "cuda"], f"--device: 'cuda': torch {torch.__version__} sees no CUDA device on this machine; "
                           "expected cpu"),
], ids=["skip-unknown", "skip-short-name", "skip-ambiguous", "skip-dense", "device-gpu", "device-nonsense",
        "device-meta", "device-xpu", "device-cuda-absent"])
def test_a_skip_or_device_it_cannot_take_is_refused(args, says, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same refusal on a machine with a GPU
    result = CliRunner().invoke(main, TINY + args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == f"Error: Invalid value for {says}"


def test_grouped_mm_is_a_skipped_row_at_sizes_its_strides_refuse(monkeypatch):
    """bf16 needs multiples of 8 (16 bytes): hidden 4 is skipped there, the other rows still run."""
    monkeypatch.setattr("moebuild.bench.MIN_SAMPLE_S", 0.0)
    args = ["bench", "moe", "--experts", "4", "--top-k", "2", "--hidden", "4", "--intermediate", "16", "--tokens", "3",
            "--repeats", "1", "--backward", "--dtype", "bfloat16", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = {r["impl"]: r for r in json.loads(result.output)["results"]}
    assert rows["transformers grouped_mm"]["skipped"] == ("torch._grouped_mm needs 16-byte strides: hidden and "
                                                         "intermediate multiples of 8 in bfloat16, not 4 and 16")
    assert all(r["forward_backward_ms"] > 0 for name, r in rows.items() if name != "transformers grouped_mm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_grouped_mm_skip_rule_is_the_ops_own(dtype):
    """The rule follows torch._grouped_mm itself: where it skips the op refuses, elsewhere it runs (fwd+bwd)."""
    from moebuild.bench import MoEConfig, _skip_reason, build_layers, fixed_routing

    for hidden, intermediate in ((6, 8), (8, 6), (4, 8), (8, 4), (8, 8), (12, 8)):
        cfg = MoEConfig(experts=4, top_k=2, hidden=hidden, intermediate=intermediate)
        layer, _ = build_layers(cfg, torch.device("cpu"), dtype)["transformers grouped_mm"]
        weights_TK, ids_TK = fixed_routing(3, cfg, torch.device("cpu"))
        try:
            layer(torch.randn(3, hidden, dtype=dtype, requires_grad=True), weights_TK, ids_TK).sum().backward()
            runs = True
        except RuntimeError as exc:
            assert "16 bytes" in str(exc)
            runs = False
        assert runs == (_skip_reason("transformers grouped_mm", 3, cfg, dtype) is None), (hidden, intermediate)
