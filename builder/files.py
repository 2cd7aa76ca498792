"""Reading the files a user names: only regular files are opened, since opening a pipe blocks until a
writer comes and a device (`/dev/zero`) never ends. Specs have their own, stricter reader
(moebuild.spec.tree: a size cap and positions)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def unreadable(path: str | os.PathLike) -> str | None:
    """Why `path` is not a regular file to read (a few words), or None when it is one."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a device
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return exc.strerror or "cannot read it"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe, device or socket)"
    return None


def read_text(path: Path, error: type[Exception]) -> str:
    """A regular UTF-8 file's text; anything else raises `error("PATH: why")`."""
    why = unreadable(path)
    if why is None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            why = f"cannot read it ({exc.strerror})"
        except UnicodeDecodeError:
            why = "not UTF-8 text"
    raise error(f"{path}: {why}")
