"""Shared pieces of the spec models: the strict base class and the cross-field error.

Every node of the spec subclasses `SpecModel`: unknown keys are errors (`extra="forbid"`) and the
attribute docstring under each field becomes its description in the JSON Schema.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict

TokenSelector = Literal["all", "text", "image"]
"""Which tokens a route or a balancing term sees, by modality."""

Path = tuple[str | int, ...]

Activation = Literal["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu"]
"""Activation functions, by their transformers names."""


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class CrossFieldError(ValueError):
    """Raised by the root validator with every rule that spans several fields, each at its own path.

    Pydantic wraps it as one 'value_error' at the root; the loader unpacks `problems` into one
    located diagnostic per problem.
    """

    def __init__(self, problems: list[tuple[Path, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{format_path(path)}: {msg}" for path, msg in problems))


def format_path(path: Path) -> str:
    """``("moe", "routes", 0, "top_k")`` -> ``moe.routes[0].top_k``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def did_you_mean(word: object, candidates: Iterable[object]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
