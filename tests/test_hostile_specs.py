"""Hostile and careless specs: each ends in one located error line and exit 1 within 5 s,
with no traceback, hang, leak or allocation attempt (each runs as a real process with a timeout).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BASE = "base: micro-moe-llava\n"


def bomb(levels: int = 9) -> str:
    lines = [BASE, 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int = 9) -> str:
    lines = [BASE, "x:", "  a0: &a0 {}"]
    lines += [f"  a{i}: &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * 10) + "]}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def doubling(times: int = 30) -> str:
    lines = [BASE, "description: abcdefgh"]
    previous = "description"
    for i in range(times):
        lines.append(f"x{i}: ${{{previous}}}${{{previous}}}")
        previous = f"x{i}"
    return "\n".join(lines) + "\n"


CASES = {  # name -> (file content, or None for a special file; the error the line must say)
    "alias bomb": (bomb(), r"expands to more than 20,000 values"),
    "alias bomb in a base": ("base: bomb.yaml\nname: child\n", r"bomb\.yaml:1:1: error: expands to more than"),
    "interpolation doubling": (doubling(), r"would grow the spec past 100,000 characters"),
    "merge-key bomb": (merge_bomb(), r"expands to more than 20,000 values"),
    "self merge": (BASE + "x: &a {<<: *a}\n", r"an alias here refers to a node that contains it"),
    "5000-digit hex integer": (BASE + "language: {vocab_size: 0x" + "f" * 5000 + "}\n",
                               r"language\.vocab_size: cannot read this value: integers in a spec fit in 64 bits"),
    "5000-digit integer": (BASE + "language: {vocab_size: " + "9" * 5000 + "}\n",
                           r"spec\.yaml:2:24: error: language\.vocab_size: cannot read this value: integers in a spec "
                           r"fit in 64 bits$"),
    "base fifo": ("base: base.fifo.yaml\n", r"base file 'base\.fifo\.yaml' is not a regular file but a pipe"),
    "tokenizer is a file": (BASE + "tokenizer: /etc/passwd\n",
                            r"spec\.yaml:2:12: error: tokenizer: '/etc/passwd': is a file; "
                            r"give the tokenizer's directory"),
    "1000 routes": (BASE + "moe: {routes: [" + ", ".join(["{pool: experts, causal: false, router: {type: topk, top_k: 1}}"] * 1000)
                    + "]}\n", r"moe\.routes: must have at most 64 items, got 1000"),
    "deep flow nesting": (BASE + "name: " + "[" * 5000 + "]" * 5000 + "\n", r"nested too deeply"),
    "deep block nesting": (BASE + "".join(f"{' ' * 2 * i}k{i}:\n" for i in range(40)) + " " * 80 + "v: 1\n",
                           r"nested too deeply"),
    "python object/apply": (BASE + 'name: !!python/object/apply:os.system ["echo pwned"]\n',
                            r"spec\.yaml:2:7: error: name: unknown tag '!!python/object/apply:os\.system'.*never run"),
    "python object/new": (BASE + "name: !!python/object/new:os.system [x]\n", r"unknown tag '!!python/object/new"),
    "omap": (BASE + "tokens: !!omap [{pad: 0}]\n", r"tokens: unknown tag '!!omap'"),
    "env resolver": (BASE + "name: ${oc.env:HOME}\n", r"name: resolvers are not allowed \(\$\{oc\.env:\.\.\.\}\)"),
    "custom resolver": (BASE + 'name: "${oc.create:{a: 1}}"\n', r"resolvers are not allowed"),
    "cyclic reference": (BASE + "name: ${description}\ndescription: ${name}\n", r"cyclic reference"),
    "base is not yaml": ("base: /etc/passwd\n", r"base file '/etc/passwd' must be a \.yaml or \.yml file"),
    "absolute base": ("base: /etc/secrets.yaml\n", r"must be a path relative to this spec, not an absolute one"),
    "head_dim with indivisible hidden": (
        BASE + "language: {hidden_size: 130, head_dim: 32}\n", r"language: hidden_size 130 is not divisible by num_heads 4"),
    "num_experts 1e12": (BASE + "moe: {pools: {experts: {num_experts: 1000000000000}}}\n",
                         r"moe\.pools\.experts\.num_experts: must be <= 65536"),
    "num_layers 1e12": (BASE + "language: {num_layers: 1000000000000}\n", r"language\.num_layers: must be <= 1024"),
    "vocab 1e9": (BASE + "language: {vocab_size: 1000000000}\n", r"language\.vocab_size: must be <= 4194304"),
    "positions 1e12": (BASE + "language: {max_position_embeddings: 1000000000000}\n", r"must be <= 16777216"),
    "capacity.min 1e12": (BASE + "moe: {routes: [{tokens: all, pool: experts, causal: false, router: "
                          "{type: deepspeed_top2, capacity: {train: 1.5, min: 1000000000000}}}]}\n",
                          r"capacity\.min: must be <= 1048576"),
    "context hops 1e9": (BASE + "moe: {routes: [{pool: experts, router: {type: context, top_k: 2, hops: 1000000000}}]}\n",
                         r"hops: must be <= 16"),
    "quoted integer": (BASE + "language: {hidden_size: '128'}\n",
                       r"spec\.yaml:2:25: error: language\.hidden_size: expected an integer, got '128'"),
    "moe layer listed twice": (BASE + "moe: {layers: [0, 2, 0]}\n",
                               r"spec\.yaml:2:22: error: moe\.layers\[2\]: layer 0 is already listed at moe\.layers\[0\]"),
    "infinite float": (BASE + "language: {rope_theta: .inf}\n", r"language\.rope_theta"),
    "missing pretrained": (BASE + "language: {pretrained: /no/such/dir}\n",
                           r"spec\.yaml:2:24: error: language\.pretrained: '/no/such/dir': no such directory"),
    "pickle-only pretrained": (BASE + "language: {pretrained: pickles}\n", r"holds no \.safetensors files .*never loads"),
    "fifo": (None, r"is not a regular file"),
    "dev zero": (None, r"/dev/zero: error: is not a regular file"),
    "50 MB file": (None, r"is larger than 1 MiB"),
}


COMPILED = {"alias bomb", "python object/apply", "fifo", "env resolver", "num_experts 1e12"}
"""Cases also run through `compile` (the same loader; the rest run through `validate` only, to keep time)."""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "moebuild.cli", *args], capture_output=True, text=True, timeout=5,
                          cwd=cwd, env=env)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "bomb.yaml").write_text(bomb())
    (tmp_path / "pickles").mkdir()
    (tmp_path / "pickles" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    os.mkfifo(tmp_path / "base.fifo.yaml")  # a base that would block a reader forever
    return tmp_path


@pytest.mark.parametrize("case", CASES)
def test_hostile_spec_is_one_located_line_and_exit_1(case, workdir):
    content, expected = CASES[case]
    if content is not None:
        (workdir / "spec.yaml").write_text(content)
        target = "spec.yaml"
    elif case == "fifo":
        os.mkfifo(workdir / "spec.yaml")
        target = "spec.yaml"
    elif case == "dev zero":
        target = "/dev/zero"
    else:
        (workdir / "spec.yaml").write_text("# " + "x" * (50 << 20) + "\n")
        target = "spec.yaml"
    verbs = [["validate", target]] + ([["compile", target, "-o", "out"]] if case in COMPILED else [])
    for verb in verbs:
        result = run(*verb, cwd=workdir)
        assert result.returncode == 1, (verb, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert errors and all(re.match(r"^\S.*?(:\d+:\d+)?: error: ", line) for line in errors), result.stderr
        assert re.search(expected, result.stderr), result.stderr
        assert not (workdir / "out").exists()
    assert "pwned" not in result.stdout + result.stderr


@pytest.mark.parametrize("value, expected", [
    ("language.vocab_size=" + "9" * 5000,
     r"language\.vocab_size: cannot read this value: integers in a spec fit in 64 bits$"),
    ("name=&a [*a]", r"name\[0\]: an alias here refers to a node that contains it"),
    ("name=!!python/object/apply:os.system [ls]", r"unknown tag '!!python/object/apply:os\.system'"),
    ("+" + ".".join(["a"] * 100) + "=1", r"a key nests at most 32 levels"),
    ("base=micro-ltdr", r"base: cannot be set by an override .*'base: micro-ltdr' instead"),
])
def test_hostile_overrides_are_one_line_and_exit_1(value, expected, tmp_path):
    result = run("show", "micro-moe-llava", "--set", value, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(expected, result.stderr), result.stderr
    assert len(result.stderr) < 400  # a 5,000-digit override is not echoed whole


def test_an_error_never_prints_a_file_that_is_not_a_spec(tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    result = run("validate", str(secret), cwd=tmp_path)
    assert result.returncode == 1 and "root:x" not in result.stderr
    assert "expected a mapping of spec keys, got a string" in result.stderr
