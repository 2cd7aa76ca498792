"""`moebuild compile` and `moebuild summary`: what they write, what they refuse, what they print."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from moebuild.cli import main
from moebuild.model.vlm import MoEVLMForConditionalGeneration


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_compile_writes_a_loadable_model_and_prints_the_summary(tmp_path):
    out = tmp_path / "m"
    result = run("compile", "micro-moe-llava", "-o", str(out), "--seed", "3", "--set", "moe.layers=all")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "spec.yaml", "generation_config.json", ".moebuild.json"}
    assert "2,102,784" in result.stdout and f"wrote {out}" in result.stdout  # 4 MoE layers now
    model = MoEVLMForConditionalGeneration.from_pretrained(out)
    assert model.spec.moe.layers == "all"
    assert not list(tmp_path.glob(".m.*"))  # the staging directory is gone


def test_compile_seed_makes_the_weights_reproducible(tmp_path):
    for name in ("a", "b"):
        assert run("compile", "micro-moe-llava", "-o", str(tmp_path / name), "--seed", "7").exit_code == 0
    a = MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "a").state_dict()
    b = MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_replaces_only_a_model_it_wrote(tmp_path):
    out = tmp_path / "m"
    assert run("compile", "micro-moe-llava", "-o", str(out)).exit_code == 0
    again = run("compile", "micro-moe-llava", "-o", str(out))
    assert again.exit_code == 1
    assert again.stderr.strip() == f"Error: {out} exists and is not empty (--force replaces a model moebuild wrote there)"
    assert run("compile", "micro-moe-llava", "-o", str(out), "--force").exit_code == 0
    (out / "keep.txt").write_text("mine")
    refused = run("compile", "micro-moe-llava", "-o", str(out), "--force")
    assert refused.exit_code == 1 and "keep.txt" in refused.stderr and "Traceback" not in refused.output
    assert (out / "keep.txt").read_text() == "mine"


def test_compile_force_refuses_the_root_directory_before_building(monkeypatch):
    import shutil

    from moebuild.model import vlm as compile_module

    deleted = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: deleted.append(path))
    monkeypatch.setattr(compile_module, "build", lambda *a, **k: pytest.fail("built before refusing"))
    result = run("compile", "micro-moe-llava", "-o", "/", "--force")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: refusing to write a model to /: it is the root directory"
    assert deleted == []


def test_compile_on_meta_writes_config_and_spec_only(tmp_path):
    result = run("compile", "micro-deepseek-vl2", "-o", str(tmp_path / "m"), "--device", "meta")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "spec.yaml", ".moebuild.json"}
    assert "built on meta" in result.stdout


def test_compile_bad_spec_is_located_and_writes_nothing(tmp_path):
    result = run("compile", "micro-deepseek-vl2", "-o", str(tmp_path / "m"), "--set", "moe.routes.1.router.top_k=17")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "<override 'moe.routes.1.router.top_k=17'>:1:27: error: moe.routes[1].router.top_k: "
        "must be <= 16 (pool 'routed' has 16 experts)"
    )
    assert not (tmp_path / "m").exists()


def test_compile_error_while_building_is_one_line_and_leaves_no_output(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 16)  # a header length no file has
    result = run("compile", "micro-moe-llava", "-o", str(tmp_path / "m"), "--set", f"language.pretrained={checkpoint}")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: micro-moe-llava: ") and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_compile_refuses_weights_that_exceed_the_memory_before_allocating(tmp_path, monkeypatch):
    from moebuild.model import memory_budget

    monkeypatch.setattr(memory_budget, "available_bytes", lambda device: 1 << 20)
    result = run("compile", "micro-moe-llava", "-o", str(tmp_path / "m"))
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: micro-moe-llava needs 0.0 GiB for its weights in float32 but 0.0 GiB of cpu memory is available; "
        "build it on device='meta' (moebuild compile --device meta) to inspect it without allocating")
    assert list(tmp_path.iterdir()) == []


def test_summary_json_has_the_contract_keys():
    result = run("summary", "micro-deepseek-vl2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("total_params", "active_params"):
        assert isinstance(report[key], int)
    components = report["components"]
    assert components["vision"]["total"] + components["connector"]["total"] + components["language"]["total"] == (
        report["total_params"]
    )
    assert components["language"]["active"] < components["language"]["total"]
    assert components["language"]["embedding"] == 512 * 128


def test_summary_refuses_a_context_past_the_positions_and_caps_its_default():
    result = run("summary", "micro-moe-llava", "--context", "4097")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: Invalid value for --context: 4097 exceeds the model's 4096 positions (language.max_position_embeddings)")
    assert run("summary", "micro-moe-llava", "--context", "4096", "--json").exit_code == 0
    result = run("summary", "micro-moe-llava", "--set", "language.max_position_embeddings=1024", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["context"] == 1024  # not the 2048 it cannot reach


@pytest.mark.parametrize("flags", [["--dtype", "bfloat16"], ["--seed", "7"], ["--seed", "0"]])
def test_flags_a_meta_build_would_ignore_are_refused(tmp_path, flags):
    result = run("compile", "micro-moe-llava", "-o", str(tmp_path / "m"), "--device", "meta", *flags)
    assert result.exit_code == 2 and not (tmp_path / "m").exists()
    assert f"--device meta writes the config and spec only, no weights: {flags[0]} would change nothing" in result.output
