"""FSDP2 for the replicated weights of an expert-parallel model.

`fully_shard` (torch.distributed.fsdp) each decoder layer, then the whole model, with the
expert-parallel pools' tensors left out (`ignored_params`): those are already split over the
ranks, one expert per owner, and FSDP must neither shard nor reduce them. FSDP2 shards the rest
over the same world and averages their gradients (reduce-scatter); the expert gradients arrive
summed over the ranks' tokens, so call `average_expert_grads(model)` after backward, as with DDP.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard

from moebuild.moe.experts import ExpertPool


def expert_parameters(module: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The tensors of the expert-parallel pools under `module` (each rank's own experts)."""
    return {p for m in module.modules() if isinstance(m, ExpertPool) and m.parallel is not None
            for p in m.parameters(recurse=False)}


def fully_shard_replicated(model: torch.nn.Module, **fsdp_kwargs) -> torch.nn.Module:
    """FSDP2 over every weight but the expert-parallel pools': one unit per decoder layer, the rest
    at the root. `fsdp_kwargs` go to every `fully_shard` call (mesh, mp_policy, ...)."""
    for layer in model.language.layers:
        fully_shard(layer, ignored_params=expert_parameters(layer), **fsdp_kwargs)
    fully_shard(model, ignored_params=expert_parameters(model), **fsdp_kwargs)
    return model
