"""Shared pieces of the spec models: the strict base class and the cross-field error.

Every node of the spec subclasses `SpecModel`: unknown keys are errors (`extra="forbid"`), values
are never coerced (`strict=True`: `true`, `'128'` and `2.0` are not integers, `"yes"` is not a bool;
a number still takes an integer, `layer_norm_eps: 1`), and the attribute docstring under each field becomes its
description in the JSON Schema.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenSelector = Literal["all", "text", "image"]
"""Which tokens a route or a balancing term sees, by modality."""

Path = tuple[str | int, ...]

Activation = Literal["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu"]
"""Activation functions, by their transformers names."""


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, validate_default=True,
                              allow_inf_nan=False)


def up_to(high: int, low: int = 1) -> type[int]:
    """An integer in [low, high]. Every count and size in a spec is bounded, so no value can ask
    for terabytes or a loop of 10**12 steps (the bounds are far above any published model)."""
    return Annotated[int, Field(ge=low, le=high)]


Width = up_to(65_536)
"""Hidden sizes, head dimensions and latent ranks."""
FFNWidth = up_to(262_144)
"""FFN and expert intermediate sizes."""
LayerCount = up_to(1_024)
HeadCount = up_to(1_024)
ExpertCount = up_to(65_536)
"""Experts in a pool, and counts of experts or groups of them."""
VocabSize = up_to(4_194_304)
TokenId = up_to(4_194_304 - 1, low=0)
Positions = up_to(16_777_216)
ImageSide = up_to(16_384)
"""Image, tile and patch sides in pixels."""
SmallCount = up_to(64)
"""Connector depth and merge factor, tiles and images per prompt."""


def example(data: dict) -> ConfigDict:
    """A class's `model_config` carrying one example of the node: shown by editors through the JSON
    Schema, and what the tests parametrized over every type build."""
    return ConfigDict(json_schema_extra={"examples": [data]})


class RouterSpecBase(SpecModel):
    """What a router type tells about itself without torch; `summary`, the validator and the
    builder's registry read these, so a new router type is one class here and one module."""

    @classmethod
    def example(cls) -> dict:
        """The example the class's `model_config` carries (every router type has one)."""
        return cls.model_config["json_schema_extra"]["examples"][0]

    def params(self, num_experts: int, hidden: int) -> int:
        """Parameters of one layer's router over a pool of `num_experts` (default: one E x hidden weight)."""
        return num_experts * hidden

    def experts_per_token(self, num_experts: int) -> int:
        """The most experts of its pool this router gives one token."""
        raise NotImplementedError(f"{type(self).__name__} must say how many experts a token uses")

    def compares_tokens(self) -> str | None:
        """Why a token's routing depends on the other tokens of the call, or None when it does not.

        Such a router on a route over text lets a causal language model see later tokens in
        training (the spec must then say `causal: false` on the route)."""
        return None


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
