"""The error a user can cause with a spec: one located, readable line per problem.

Lines follow the compiler convention (GCC / Clang) that editors and CI annotators parse:
``file:line:col: error: moe.routes[0].router.top_k: must be <= 4 (pool 'experts' has 4 experts)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# One implementation for the schema rules and the loader; re-exported here for the builder.
from moebuild.schemas.base import did_you_mean, format_path  # noqa: F401  (did_you_mean: re-export)

SpecPath = tuple[str | int, ...]


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


class BuildError(Exception):
    """A valid spec that cannot be built here (e.g. its weights exceed the memory available); one line."""
