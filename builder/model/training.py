"""Staged training (MoE-LLaVA's three stages): which parameters each stage trains.

A `trainable` pattern names a component (`vision`, `connector`, `language`), `moe` (every expert
pool and router), or an fnmatch glob over parameter names (`language.*.mlp.*`). Everything a
stage does not name is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

from torch import nn

from moebuild.moe.layer import MoELayer


def _moe_prefixes(model: nn.Module) -> list[str]:
    """Names of the MoE layers (modules holding expert pools and routes)."""
    return [name for name, module in model.named_modules() if isinstance(module, MoELayer)]


@dataclass(frozen=True)
class StageCounts:
    """Parameters per component (vision, connector, language, moe) after a stage was applied."""

    stage: str
    trainable: dict[str, int]
    frozen: dict[str, int]

    def __str__(self) -> str:
        rows = [f"stage {self.stage}:"] + [f"  {part:<10} trainable {self.trainable[part]:>13,}  frozen {self.frozen[part]:>13,}"
                                           for part in self.trainable]
        return "\n".join(rows)


def apply_stage(model, stage: str) -> StageCounts:
    """Set requires_grad for a named stage of the spec; return the parameter counts per component."""
    stages = {s.name: s for s in (model.spec.training.stages if model.spec.training else [])}
    if stage not in stages:
        raise KeyError(f"no training stage {stage!r}; the spec has {', '.join(stages) or 'none'}")
    patterns = stages[stage].trainable
    moe_prefixes = _moe_prefixes(model)
    counts = {"vision": 0, "connector": 0, "language": 0, "moe": 0}
    frozen = dict(counts)
    unmatched = set(patterns)
    for name, param in model.named_parameters():
        in_moe = any(name.startswith(prefix + ".") for prefix in moe_prefixes)
        hits = {p for p in patterns if (in_moe if p == "moe" else name.startswith(p + ".") or fnmatch(name, p))}
        unmatched -= hits
        param.requires_grad_(bool(hits))
        part = "moe" if in_moe else name.split(".", 1)[0]
        (counts if param.requires_grad else frozen)[part] += param.numel()
    if unmatched:  # a pattern that trains nothing is a mistake, never silently ignored
        raise ValueError(f"training stage {stage!r}: {', '.join(sorted(unmatched))} matches no parameter "
                         "(use a component, moe, or a glob over parameter names such as language.model.layers.*.mlp.*)")
    return StageCounts(stage, counts, frozen)
