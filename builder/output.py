"""Model directories written safely: never deleting or overwriting what moebuild did not write.

A model is written into a hidden staging directory beside the output (`.NAME.moebuild-staging-PID-*`),
which gets a marker file, `.moebuild.json`, listing every file moebuild wrote, and is renamed onto
the output at the end. `force` replaces an existing output only when its marker says moebuild
wrote everything in it, and never when it is, holds or lies inside one of the command's inputs;
`/`, the home directory and the current directory (or any directory holding it) are never a target. The final check and rename happen under a lock on the parent
directory, so an output that appeared during the build is never replaced, and the rename itself
cannot replace a non-empty directory. A killed run leaves only its staging directory, which the
next run to the same output removes once its process is gone.

A single file (a schema, a drawing, a spec) is written the same way: `write_file` refuses an
existing file without `force` and renames a finished temporary file onto the output.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

MARKER = ".moebuild.json"
_STAGING = ".{name}.moebuild-staging-"
_REPLACED = ".{name}.moebuild-replaced-"


class OutputError(Exception):
    """An output directory moebuild must not write to; `str()` is one line."""


def check_output(output: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Raise OutputError unless `output` may receive a model (checked again before the final rename).
    `inputs` are the paths the command reads; replacing any of them, or what holds them, is refused."""
    target = output.absolute()
    _check_parent(output)
    try:
        resolved = target.resolve()
        target.exists()
    except OSError as exc:  # a name past the file system's limit, a loop of links
        raise OutputError(f"cannot write {output}: {exc.strerror}") from None
    for protected, what in ((Path("/"), "the root directory"), (Path.home(), "your home directory")):
        if resolved == protected.resolve():
            raise OutputError(f"refusing to write a model to {output}: it is {what}")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"refusing to write a model to {output}: it is or holds the current directory")
    if target.is_symlink():
        raise OutputError(f"{output} is a symbolic link; give the directory itself")
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"{output} exists and is not a directory")
    if not any(target.iterdir()):
        return
    _check_not_an_input(output, inputs)
    if not force:
        raise OutputError(f"{output} exists and is not empty (--force replaces a model moebuild wrote there)")
    foreign = files_not_written_by_moebuild(target)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"--force replaces only what moebuild wrote, and {output} also holds {shown}; "
                          "move them away or choose another output")


def _check_parent(output: Path) -> None:
    """The nearest existing directory above `output` must be a directory, so the output can be made."""
    for parent in output.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputError(f"cannot write {output}: {parent} is a file, not a directory")
            return


def _check_not_an_input(output: Path, inputs: Iterable[Path]) -> None:
    resolved = output.absolute().resolve()
    for path in inputs:
        read = Path(path).absolute().resolve()
        if read == resolved or resolved in read.parents or read in resolved.parents:
            relation = ("is" if read == resolved else "holds" if resolved in read.parents else "lies inside")
            raise OutputError(f"refusing to replace {output}: it {relation} the input {path}; choose another output")


def write_file(output: Path, write: Callable[[Path], None], force: bool = False, inputs: Iterable[Path] = ()) -> None:
    """Call `write(path)` on a temporary file beside `output` (same extension), then rename it onto
    `output`: an existing file is replaced only with `force`, and never one of `inputs`."""
    target = output.absolute()
    _check_parent(output)
    if target.is_symlink() or target.is_dir():
        raise OutputError(f"{output} is a {'symbolic link' if target.is_symlink() else 'directory'}; give a file")
    if target.exists():
        _check_not_an_input(output, inputs)
        if not force:
            raise OutputError(f"{output} exists (--force replaces it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{_short(target.stem)}.moebuild-staging-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def files_not_written_by_moebuild(directory: Path) -> list[str]:
    """Entries under `directory` (files, links, directories) that its marker does not account for:
    all of them without a valid marker. A directory counts as written only when it holds a written file."""
    present = []
    for root, dirs, files in os.walk(directory):  # links are entries here, never followed
        present += [os.path.relpath(os.path.join(root, name), directory) for name in (*dirs, *files)]
    try:
        written = set(json.loads((directory / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(present)
    holding = {str(parent) for name in written for parent in Path(name).parents if str(parent) != "."}
    return sorted(p for p in present if p not in written and (p not in holding or (directory / p).is_symlink()))


def write_model_dir(output: Path, write: Callable[[Path], None], force: bool = False,
                    inputs: Iterable[Path] = ()) -> None:
    """Call `write(directory)` on a fresh staging directory, then move it to `output` safely;
    `inputs` as in `check_output`."""
    inputs = tuple(inputs)
    check_output(output, force, inputs)
    parent = output.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(parent, output.name)
    staging = _fresh_dir(parent, _STAGING.format(name=_short(output.name)))
    try:
        write(staging)
        _default_permissions(staging)
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if not p.is_dir())
        (staging / MARKER).write_text(json.dumps({"written_by": "moebuild", "files": files}, indent=1) + "\n")
        with _locked(parent):
            _move_into_place(staging, output, force, inputs)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _move_into_place(staging: Path, output: Path, force: bool, inputs: Iterable[Path]) -> None:
    try:
        check_output(output, force, inputs)  # anything may have appeared while the model was built
    except OutputError as exc:
        raise OutputError(f"{exc} (it changed while the model was being built)") from None
    target = output.absolute()
    old = None
    if target.exists() and any(target.iterdir()):
        old = _fresh_dir(target.parent, _REPLACED.format(name=_short(output.name)))
        os.replace(target, old)  # onto an empty directory made a moment ago
    try:
        os.rename(staging, target)  # fails (ENOTEMPTY) rather than replace a directory with content
    except OSError as exc:
        if old is not None:
            os.replace(old, target)
        raise OutputError(f"cannot move the model into {output}: {exc.strerror}") from None
    if old is not None:
        shutil.rmtree(old)


def _default_permissions(directory: Path) -> None:
    """Give every file the mode a new file gets under the user's umask: safetensors writes 0600 (it
    goes through a private temporary file), which hides a model from the rest of a shared group."""
    probe = directory / ".moebuild-mode-probe"
    probe.touch()
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _short(name: str) -> str:
    """`name` in a staging directory's name: a long one is cut and hashed, so the staging name
    stays within the 255 bytes a file name may have wherever the output's own name does."""
    if len(name.encode()) <= 120:
        return name
    return name.encode()[:80].decode(errors="ignore") + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new directory `prefix + PID-random` with the user's default permissions (not mkdtemp's 0700)."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path


def _remove_abandoned(parent: Path, name: str) -> None:
    """Staging and replaced directories of runs whose process is gone (killed mid-way)."""
    for prefix in (_STAGING.format(name=_short(name)), _REPLACED.format(name=_short(name))):
        for path in parent.glob(glob.escape(prefix) + "*"):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if path.is_dir() and not path.is_symlink() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on a directory, so two runs never check and rename at the same time. Where
    there is no flock (Windows) the rename alone still refuses to replace a directory with content."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
