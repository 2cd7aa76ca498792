"""The moebuild CLI: exit codes, one located line per error, no traceback, no torch import."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from moebuild.cli import main
from moebuild.spec.loading import load_spec, resolve_spec
from moebuild.spec.presets import list_presets, preset_family

DATA = Path(__file__).parent / "data"
LOCATED = re.compile(r"^(\S+):(\d+):(\d+): error: ")


@pytest.fixture(autouse=True)
def _in_tests_data(monkeypatch):
    monkeypatch.chdir(DATA)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("spec, located, says", [
    ("broken/typo_key.yaml", "broken/typo_key.yaml:7:28", "unknown key 'tpo_k'; did you mean 'top_k'?"),
    ("broken/wrong_type.yaml", "broken/wrong_type.yaml:4:15", "vision.image_size: expected an integer, got 'abc'"),
    ("broken/unknown_type.yaml", "broken/unknown_type.yaml:7:22", "unknown type 'topkk'"),
    ("broken/missing_pool.yaml", "broken/missing_pool.yaml:6:13", "moe.routes[0].pool: no pool named 'expert'"),
    ("broken/bad_base.yaml", "broken/bad_base.yaml:2:7", "did you mean 'micro-moe-llava'?"),
    ("broken/cycle_a.yaml", "broken/cycle_b.yaml:1:7", "cyclic base: broken/cycle_a.yaml -> broken/cycle_b.yaml"),
    ("broken/not_yaml.yaml", "broken/not_yaml.yaml:3:9", "not valid YAML"),
    ("broken/empty.yaml", "broken/empty.yaml:1:1", "empty file"),
])
def test_broken_spec_prints_located_lines_and_exits_1(spec, located, says):
    result = run("validate", spec)
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(LOCATED.match(line) for line in lines), lines
    assert any(line.startswith(f"{located}: error: ") and says in line for line in lines), lines
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, line", [
    (["validate", "broken"], "broken: error: is a directory, not a YAML spec file"),
    (["validate", "nope.yaml"], "nope.yaml: error: no such file"),
    (["show", "micro-moe-lava"],
     "micro-moe-lava: error: no such file, and unknown preset 'micro-moe-lava'; did you mean 'micro-moe-llava'?"),
    (["validate", "micro-moe-llava", "--set", "moe.pools.experts.num_expert=8"],
     "<override 'moe.pools.experts.num_expert=8'>:1:1: error: moe.pools.experts.num_expert: no such key; "
     "did you mean 'num_experts'? (to add a key, write '+moe.pools.experts.num_expert=8')"),
])
def test_unlocatable_and_override_errors(args, line):
    result = run(*args)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [line]


def test_a_directory_named_after_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "micro-moe-llava").mkdir()
    result = run("show", "micro-moe-llava")
    assert result.exit_code == 0 and "name: micro-moe-llava" in result.stdout
    result = run("validate", "./micro-moe-llava")
    assert result.stderr == "./micro-moe-llava: error: is a directory, not a YAML spec file\n"


@pytest.mark.parametrize("args, line", [
    (["validate", "micro-moe-llava", "--set", "tokens.image=1"],
     "<override 'tokens.image=1'>:1:14: error: tokens.image: 1 is also tokens.bos; the image placeholder needs an id "
     "of its own"),
    (["validate", "micro-moe-llava", "--set", "tokens.image=5"],
     "<override 'tokens.image=5'>:1:14: error: tokens.image: 5 is a byte id of the built-in byte tokenizer "
     "(tokenizer: null gives byte b the id b + 3, so text takes ids 3..258); set tokens.image outside that range "
     "(e.g. 511)"),
    (["validate", "micro-moe-llava", "--set", "language.num_layers=2", "--set", "language.num_layers=6"],
     "<override 'language.num_layers=6'>:1:1: error: language.num_layers: the same key as the override "
     "'language.num_layers=2' before it; give each key once (the last would silently win)"),
    (["validate", "micro-moe-llava.yaml"], "micro-moe-llava.yaml: error: no such file; did you mean the preset "
                                           "'micro-moe-llava'?"),
])
def test_refusals_are_one_located_line(args, line):
    result = run(*args)
    assert result.exit_code == 1 and result.stderr.splitlines() == [line]


def test_validate_reports_every_spec_and_every_error():
    result = run("validate", "micro-ltdr", "broken/many_errors.yaml", "broken/wrong_type.yaml")
    assert result.exit_code == 1
    assert result.stdout == "ok: micro-ltdr\n"
    assert len(result.stderr.splitlines()) == 4 + 1


def test_validate_ok():
    result = run("validate", *list_presets(), "inherit/parent.yaml")
    assert result.exit_code == 1  # parent.yaml is a fragment: the line says what is missing
    assert result.stdout.splitlines() == [f"ok: {name}" for name in list_presets()]
    assert all(LOCATED.match(line) for line in result.stderr.splitlines())


def test_real_process_exit_status_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "moebuild.cli", "validate", "broken/typo_key.yaml", "broken"],
                          capture_output=True, text=True, cwd=DATA)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "broken: error: is a directory, not a YAML spec file"


def test_show_prints_a_spec_that_loads_back(tmp_path):
    result = run("show", "micro-ltdr", "--set", "moe.routes.1.router.top_k=4")
    assert result.exit_code == 0
    (tmp_path / "shown.yaml").write_text(result.stdout)
    assert load_spec(tmp_path / "shown.yaml") == load_spec("micro-ltdr", ["moe.routes.1.router.top_k=4"])


def test_show_raw_works_on_an_invalid_spec():
    result = run("show", "--raw", "broken/wrong_type.yaml")
    assert result.exit_code == 0 and "image_size: abc" in result.stdout


def test_ls_one_line_per_preset():
    result = run("ls")
    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [row[:2] for row in rows] == [[name, preset_family(name)] for name in list_presets()]


def test_schema_validates_every_preset(tmp_path):
    result = run("schema", "-o", str(tmp_path / "moebuild.schema.json"))
    assert result.exit_code == 0
    schema = json.loads((tmp_path / "moebuild.schema.json").read_text())
    assert schema["$schema"].endswith("2020-12/schema") and schema["title"] == "moebuild spec"
    validator = jsonschema.Draft202012Validator(schema)
    for name in list_presets():
        assert list(validator.iter_errors(resolve_spec(name))) == [], name
    assert list(validator.iter_errors({"moebuild_version": 1, "name": "x", "vison": {}}))  # not a no-op


def test_schema_replaces_a_file_only_with_force(tmp_path):
    out = tmp_path / "moebuild.schema.json"
    out.write_text("my notes")
    result = run("schema", "-o", str(out))
    assert result.exit_code == 1 and result.output.strip() == f"Error: {out} exists (--force replaces it)"
    assert out.read_text() == "my notes"
    assert run("schema", "-o", str(out), "--force").exit_code == 0
    assert json.loads(out.read_text())["title"] == "moebuild spec"


@pytest.mark.parametrize("argv", [
    ["schema"], ["compile", "micro-moe-llava"], ["graph", "micro-moe-llava"], ["import", "hf", "."],
    ["import", "hf", ".", "--spec-only"], ["export", "hf", "."], ["trace", "micro-moe-llava", "--prompt", "hi"],
    ["train", "micro-moe-llava", "--data", "records.jsonl"],
], ids=lambda argv: " ".join(argv[:2]) + (" --spec-only" if "--spec-only" in argv else ""))
def test_an_empty_output_is_refused_as_empty(argv):
    """Path('') is '.': without the check, -o '' read as the current directory."""
    result = run(*argv, "-o", "")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == ("Error: Invalid value for '-o' / '--output': "
                                                       "the output path is empty; give a file or directory name")


@pytest.mark.parametrize("verb", ["ls", "show", "validate", "schema"])
def test_every_verb_has_help_with_examples(verb):
    result = run(verb, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def test_schema_help_documents_the_modeline():
    assert "# yaml-language-server: $schema=moebuild.schema.json" in run("schema", "--help").output


@pytest.mark.parametrize("argv", [
    ["--help"], ["ls"], ["show", "micro-moe-llava"], ["validate", "micro-ltdr", "broken/wrong_type.yaml"],
    ["schema"],
])
def test_light_verbs_do_not_import_torch_or_transformers(argv):
    probe = (
        "import sys\nfrom moebuild.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=DATA)
    assert "HEAVY []" in proc.stderr.splitlines(), proc.stderr[-2000:]
