"""The training section: MoE-LLaVA style stages, each naming what it trains."""

from __future__ import annotations

from pydantic import Field

from moebuild.schemas.base import SpecModel

TRAINABLE_ROOTS = ("vision", "connector", "language", "moe")
"""First segment of a trainable pattern: a component, or `moe` for every expert and router."""


class StageSpec(SpecModel):
    """One training stage; everything not listed in `trainable` is frozen."""

    name: str
    """Stage name (align, instruct, moe...)."""
    trainable: list[str] = Field(min_length=1)
    """Parameter-name patterns trained in this stage: a component (vision, connector, language, moe) or a glob like language.*.moe."""


class TrainingSpec(SpecModel):
    """Staged training recipe."""

    stages: list[StageSpec] = []
    """Stages in order."""
