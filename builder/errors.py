"""The error a user can cause with a spec: one located, readable line per problem.

Lines follow the compiler convention (GCC / Clang) that editors and CI annotators parse:
``file:line:col: error: moe.routes[0].router.top_k: must be <= 4 (pool 'experts' has 4 experts)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SpecPath = tuple[str | int, ...]


def format_path(path: Sequence[str | int]) -> str:
    """``("moe", "routes", 0, "top_k")`` -> ``moe.routes[0].top_k``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def did_you_mean(word: object, candidates: Iterable[object]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    names = [str(c) for c in candidates]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class Diagnostic:
    """One problem at one place. ``line``/``col`` are 1-based; None when the place is a whole file."""

    file: str
    line: int | None
    col: int | None
    path: SpecPath
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.col}"
        what = f"{format_path(self.path)}: {self.message}" if self.path else self.message
        return f"{where}: error: {what}"


class SpecError(Exception):
    """A spec that cannot be loaded; ``str()`` is every diagnostic, one per line."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))
