"""`moebuild import` / `moebuild export` on directories: a transformers checkpoint in, a moebuild
model directory out (loadable, same logits), and back to a checkpoint transformers loads; the
spec alone with --spec-only; pickles and foreign files refused with one line."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

import moebuild
from moebuild.cli import main

CONFIG = Qwen2MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=96, vocab_size=128, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=48)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def saved_reference(directory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.save_pretrained(directory)
    return model


def test_import_then_export_round_trips_through_the_cli(tmp_path):
    ref = saved_reference(tmp_path / "hf")
    result = run("import", "hf", tmp_path / "hf", "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "ours" / "spec.yaml").is_file()
    ours = moebuild.MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()

    result = run("export", "hf", tmp_path / "ours", "-o", tmp_path / "back")
    assert result.exit_code == 0, result.output
    assert "note: the hf config has no field" not in result.output  # load_balance maps to router_aux_loss_coef
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids_BS = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = ref(input_ids=ids_BS).logits
        assert (ours(input_ids=ids_BS).logits - expected).abs().max() <= 1e-5
        assert (back(input_ids=ids_BS).logits - expected).abs().max() <= 1e-5


def test_spec_only_writes_a_spec_that_loads(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    result = run("import", "hf", tmp_path / "cfg", "--spec-only", "-o", tmp_path / "qwen.yaml")
    assert result.exit_code == 0, result.output
    spec = moebuild.load_spec(str(tmp_path / "qwen.yaml"))
    assert spec.language.type == "qwen2" and spec.moe.pools["experts"].num_experts == 4
    assert [r.router.type for r in spec.moe.routes] == ["topk", "dense"]


def test_import_and_export_never_replace_their_input(tmp_path):
    saved_reference(tmp_path / "hf")
    config = (tmp_path / "hf" / "config.json").read_text()
    assert run("import", "hf", tmp_path / "hf", "-o", tmp_path / "ours").exit_code == 0
    for argv in (["import", "hf", tmp_path / "hf", "-o", tmp_path / "hf"],
                 ["import", "hf", tmp_path / "hf", "--spec-only", "-o", tmp_path / "hf" / "config.json"],
                 ["export", "hf", tmp_path / "ours", "-o", tmp_path / "ours"]):
        result = run(*argv, "--force")
        assert result.exit_code == 1 and "refusing to replace" in result.output, argv
    assert (tmp_path / "hf" / "config.json").read_text() == config
    assert moebuild.MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "ours") is not None
    result = run("import", "hf", tmp_path / "hf", "--spec-only", "--spec", "micro-ltdr", "-o", tmp_path / "q.yaml")
    assert result.exit_code == 2 and "takes no --spec" in result.output


@pytest.mark.parametrize("fmt, config, says", [
    ("hf", [1, 2], "config.json: expected a JSON object, found a list"),
    ("hf", {"vocab_size": None}, "config.json: no 'vocab_size', which a hf config has"),
    ("hf", {"hidden_size": -4}, "config.json: the spec it describes is not valid: language.hidden_size: Input should "
                                "be greater than or equal to 1"),
    ("deepseek_vl2", {}, "model_type 'qwen2_moe' is not DeepSeek-VL2's (deepseek_vl_v2)")])
def test_a_malformed_config_is_one_line_naming_the_key(tmp_path, fmt, config, says):
    data = CONFIG.to_dict()
    if isinstance(config, list):
        data = config
    else:
        data.update(config)
        data = {k: v for k, v in data.items() if v is not None}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(data))
    result = run("import", fmt, tmp_path / "cfg", "--spec-only", "-o", tmp_path / "q.yaml")
    assert result.exit_code == 1 and says in result.output and len(result.output.strip().splitlines()) == 1
    assert "Error: " + type(ValueError()).__name__ not in result.output


def test_pickles_and_bad_directories_are_refused_in_one_line(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    result = run("import", "hf", tmp_path / "bin", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "pickle" in result.output and "never loads" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    result = run("import", "hf", tmp_path / "nothing", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "config.json" in result.output
    result = run("export", "hf", tmp_path / "bin", "-o", tmp_path / "out")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_a_spec_transformers_cannot_compute_is_not_exported(tmp_path):
    assert run("compile", "micro-moe-llava", "-o", tmp_path / "m").exit_code == 0
    result = run("export", "hf", tmp_path / "m", "-o", tmp_path / "hf")
    assert result.exit_code == 1 and "vision tower" in result.output and not (tmp_path / "hf").exists()


def test_a_transformers_4_rope_scaling_beside_rope_parameters_wins_as_in_transformers(tmp_path):
    data = {**CONFIG.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "rope_scaling": {"type": "linear", "factor": 4.0}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(data))
    theirs = Qwen2MoeConfig.from_pretrained(tmp_path / "cfg").rope_parameters
    assert theirs["rope_type"] == "linear" and theirs["factor"] == 4.0  # what transformers' model would run
    assert run("import", "hf", tmp_path / "cfg", "--spec-only", "-o", tmp_path / "q.yaml").exit_code == 0
    scaling = moebuild.load_spec(str(tmp_path / "q.yaml")).language.rope_scaling
    assert (scaling.type, scaling.factor) == ("linear", 4.0)
