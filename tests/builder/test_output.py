"""moebuild.output: a model directory is written whole or not at all, and nothing moebuild did not
write is ever deleted or overwritten."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moebuild.output import MARKER, OutputError, check_output, write_file, write_model_dir


def write_two_files(directory: Path) -> None:
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "model.safetensors").chmod(0o600)  # as safetensors' own writer leaves it


def test_the_marker_lists_what_was_written_and_the_directory_has_normal_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        write_model_dir(tmp_path / "m", write_two_files)
    finally:
        os.umask(old_umask)
    marker = json.loads((tmp_path / "m" / MARKER).read_text())
    assert marker["files"] == ["config.json", "model.safetensors"]
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644  # written 0600 below
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging left behind


@pytest.mark.parametrize("place, reason", [
    ("root", "it is the root directory"), ("home", "it is your home directory"),
    ("cwd", "it is or holds the current directory"), ("parent of cwd", "it is or holds the current directory")])
def test_protected_places_are_refused_even_with_force(tmp_path, monkeypatch, place, reason):
    deleted = []
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: deleted.append(path))
    home, work = tmp_path / "home", tmp_path / "elsewhere" / "work"  # the home does not hold the cwd
    home.mkdir()
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = {"root": Path("/"), "home": home, "cwd": Path("."), "parent of cwd": Path("..")}[place]
    with pytest.raises(OutputError, match=f"refusing to write a model to .*: {reason}$"):
        write_model_dir(target, write_two_files, force=True)
    assert deleted == []


def test_force_keeps_links_and_empty_directories_a_user_added(tmp_path):
    out = tmp_path / "m"
    write_model_dir(out, write_two_files)
    (tmp_path / "important").mkdir()
    (out / "linked").symlink_to(tmp_path / "important")
    (out / "results").mkdir()
    with pytest.raises(OutputError, match="linked.*results|results.*linked"):
        write_model_dir(out, write_two_files, force=True)
    assert (out / "linked").is_symlink() and (out / "results").is_dir()


def test_glob_characters_in_the_name_touch_no_other_output(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other = tmp_path / f".a.moebuild-staging-{int(dead.stdout)}-0a1b2c3d"
    other.mkdir()
    write_model_dir(tmp_path / "[ab]", write_two_files)
    assert other.is_dir()  # another output's leftover: only a run to `a` removes it


def test_force_never_deletes_files_moebuild_did_not_write(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty"):
        write_model_dir(out, write_two_files)
    with pytest.raises(OutputError, match="replaces only what moebuild wrote.*notes.txt"):
        write_model_dir(out, write_two_files, force=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_force_replaces_a_model_moebuild_wrote_but_not_one_a_user_added_to(tmp_path):
    out = tmp_path / "m"
    write_model_dir(out, write_two_files)
    write_model_dir(out, lambda d: (d / "config.json").write_text('{"new": 1}'), force=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json"]
    (out / "results.csv").write_text("a,b")
    with pytest.raises(OutputError, match="results.csv"):
        write_model_dir(out, write_two_files, force=True)
    assert (out / "results.csv").read_text() == "a,b" and (out / "config.json").read_text() == '{"new": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_output_that_appears_during_the_build_is_never_replaced(tmp_path):
    out = tmp_path / "m"

    def someone_else_writes_meanwhile(directory: Path) -> None:
        write_two_files(directory)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(OutputError, match="changed while the model was being built"):
        write_model_dir(out, someone_else_writes_meanwhile, force=True)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # our staging is gone


def test_two_concurrent_writes_leave_one_complete_model_and_one_clean_error(tmp_path):
    out, both_built = tmp_path / "m", threading.Barrier(2)
    outcomes = []

    def run(tag: str) -> None:
        def write(directory: Path) -> None:
            (directory / "config.json").write_text(tag)
            both_built.wait(timeout=10)  # both checks passed before either renames

        try:
            write_model_dir(out, write)
            outcomes.append(("ok", tag))
        except OutputError as exc:
            outcomes.append(("error", str(exc)))

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(kind for kind, _ in outcomes) == ["error", "ok"]
    winner = next(tag for kind, tag in outcomes if kind == "ok")
    assert "exists and is not empty" in next(msg for kind, msg in outcomes if kind == "error")
    assert (out / "config.json").read_text() == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_killed_run_leaves_only_its_staging_which_the_next_run_removes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".m.moebuild-staging-{int(dead.stdout)}-0a1b2c3d"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    write_model_dir(tmp_path / "m", write_two_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_build_leaves_nothing(tmp_path):
    def fail(directory: Path) -> None:
        write_two_files(directory)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        write_model_dir(tmp_path / "m", fail)
    assert list(tmp_path.iterdir()) == []


def test_a_file_or_a_link_is_not_a_model_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output(tmp_path / "f", force=True)
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(tmp_path / "link", force=True)


@pytest.mark.parametrize("relation, output, read", [
    ("is", "m", "m"), ("holds", "runs", "runs/m"), ("lies inside", "m/sub", "m")])
def test_force_never_replaces_an_input_or_what_holds_it(tmp_path, relation, output, read):
    write_model_dir(tmp_path / output, write_two_files)
    if not (tmp_path / read).exists():
        write_model_dir(tmp_path / read, write_two_files, force=True)
    elif relation == "lies inside":
        write_model_dir(tmp_path / output, write_two_files, force=True)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match=f"refusing to replace .*: it {relation} the input .*{read}; choose another"):
        write_model_dir(tmp_path / output, write_two_files, force=True, inputs=[tmp_path / read])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_new_output_inside_an_input_is_allowed(tmp_path):
    write_model_dir(tmp_path / "m", write_two_files)
    write_model_dir(tmp_path / "m" / "trace", write_two_files, inputs=[tmp_path / "m"])
    assert (tmp_path / "m" / "trace" / "config.json").is_file()


def test_write_file_replaces_only_with_force_and_never_an_input(tmp_path):
    out = tmp_path / "a" / "schema.json"
    write_file(out, lambda path: path.write_text("one"))
    assert out.read_text() == "one" and sorted(p.name for p in out.parent.iterdir()) == ["schema.json"]
    with pytest.raises(OutputError, match="schema.json exists \\(--force replaces it\\)"):
        write_file(out, lambda path: path.write_text("two"))
    with pytest.raises(OutputError, match="it is the input"):
        write_file(out, lambda path: path.write_text("two"), force=True, inputs=[out])
    with pytest.raises(OutputError, match="it lies inside the input"):
        write_file(out, lambda path: path.write_text("two"), force=True, inputs=[out.parent])
    assert out.read_text() == "one"
    write_file(out, lambda path: path.write_text("two"), force=True)
    assert out.read_text() == "two"


def test_write_file_keeps_the_old_file_when_writing_fails(tmp_path):
    out = tmp_path / "g.svg"
    out.write_text("old")

    def fail(path: Path) -> None:
        assert path.suffix == ".svg" and path.parent == tmp_path  # the format follows the extension
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file(out, fail, force=True)
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["g.svg"]


@pytest.mark.parametrize("writer", ["file", "directory"])
def test_an_output_under_a_file_is_one_clear_refusal(tmp_path, writer):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(OutputError, match=f"cannot write .*: {tmp_path / 'notes'} is a file, not a directory"):
        if writer == "file":
            write_file(tmp_path / "notes" / "deep" / "s.json", lambda path: path.write_text("{}"))
        else:
            write_model_dir(tmp_path / "notes" / "m", write_two_files)
    assert (tmp_path / "notes").read_text() == "x"


def test_a_name_near_the_file_system_limit_is_written_and_one_past_it_refused(tmp_path):
    longest = "m" * 250  # fits in 255 bytes; '.NAME.moebuild-staging-PID-xxxxxxxx' did not
    write_model_dir(tmp_path / longest, write_two_files)
    write_file(tmp_path / (longest[:-5] + ".json"), lambda path: path.write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([longest, longest[:-5] + ".json"])
    with pytest.raises(OutputError, match="cannot write .*: File name too long"):
        write_model_dir(tmp_path / ("m" * 300), write_two_files)
