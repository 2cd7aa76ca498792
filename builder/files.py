"""Reading the files a user names: only regular files are opened, since opening a pipe blocks until a
writer comes and a device (`/dev/zero`) never ends. Specs have their own, stricter reader
(moebuild.spec.tree: a size cap and positions)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def unreadable(path: str | os.PathLike) -> str | None:
    """Why `path` is not a regular file to read, as words that follow its name (`PATH: does not exist`,
    `base file 'x.yaml' is a directory, not a file`), or None when it is one. Stat only: a pipe is never opened."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a device
    except FileNotFoundError:
        return "is a broken symlink" if os.path.lexists(path) else "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})" if exc.strerror else "cannot be read"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        kind = "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"is not a regular file but {kind}"
    return None


def read_text(path: Path, error: type[Exception]) -> str:
    """A regular UTF-8 file's text; anything else raises `error("PATH: why")`."""
    why = unreadable(path)
    if why is None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            why = f"cannot be read ({exc.strerror})"
        except UnicodeDecodeError:
            why = "not UTF-8 text"
    raise error(f"{path}: {why}")
