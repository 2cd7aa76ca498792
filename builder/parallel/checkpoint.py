"""Checkpoints of expert-parallel models: the files are the single-process files, whatever N.

Loading reads each rank's slice [first, first + L) of every pool tensor straight from the
safetensors files (`safe_open(...).get_slice`), so no rank holds the other ranks' experts;
everything else is read whole. Saving gathers every pool tensor over the group, and rank 0 writes
what a single process writes: the same tensors under the same names, and the config and spec with
`moe.parallel.expert_parallel: 1` (a checkpoint holds every expert, so any N dividing E loads it).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from moebuild.moe.experts import ExpertPool
from moebuild.parallel.expert import ExpertParallel
from moebuild.schemas import ModelSpec, ParallelSpec, indivisible_pools
from moebuild.spec.errors import BuildError


def with_expert_parallel(spec: ModelSpec, n: int, source: str = "expert_parallel") -> ModelSpec:
    """The spec with `moe.parallel.expert_parallel = n`, refused (BuildError) where a pool's experts
    do not split evenly over n ranks."""
    if spec.moe is None:
        if n == 1:
            return spec
        raise BuildError(f"{source}={n} needs an moe section: {spec.name} has no experts to spread")
    replicate = spec.moe.parallel.replicate
    problems = indivisible_pools(spec.moe.pools, n, replicate)
    if problems:
        raise BuildError(f"{spec.name}: " + "; ".join(problems))
    moe = spec.moe.model_copy(update={"parallel": ParallelSpec(expert_parallel=n, replicate=replicate)})
    return spec.model_copy(update={"moe": moe})


def sharded_pools(model: torch.nn.Module) -> dict[str, ExpertPool]:
    """The model's expert-parallel pools by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertPool) and m.parallel is not None}


def expert_parallel_of(model: torch.nn.Module) -> ExpertParallel | None:
    return next((pool.parallel for pool in sharded_pools(model).values()), None)


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(directory.glob("*.safetensors"))


def load_expert_parallel(model: torch.nn.Module, directory: str | Path) -> None:
    """Fill an expert-parallel model from a checkpoint directory, strictly: every missing,
    unexpected or mis-shaped tensor is named in one CheckpointError."""
    from moebuild.model.pretrained import CheckpointError

    directory = Path(directory)
    files = checkpoint_files(directory)
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files")
    own = model.state_dict()
    slices = {f"{name}.{key}": (pool.first_expert, pool.num_local_experts)
              for name, pool in sharded_pools(model).items() for key, _ in pool.named_parameters(recurse=False)}
    seen, unexpected, shapes = set(), [], []
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key not in own:
                        unexpected.append(key)
                        continue
                    if key in slices:
                        first, n = slices[key]
                        part = f.get_slice(key)
                        full = tuple(part.get_shape())
                        tensor = part[first:first + n] if full[0] >= first + n else None
                        want = (own[key].shape[0] * model_ranks(model), *own[key].shape[1:])
                        if tensor is None or full != want:
                            shapes.append(f"{key} (checkpoint {full}, model {want})")
                            continue
                    else:
                        tensor = f.get_tensor(key)
                        if tensor.shape != own[key].shape:
                            shapes.append(f"{key} (checkpoint {tuple(tensor.shape)}, model {tuple(own[key].shape)})")
                            continue
                    with torch.no_grad():
                        own[key].copy_(tensor)
                    seen.add(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    loaded = {own[k].data_ptr() for k in seen}
    missing = sorted(k for k in own if k not in seen and own[k].data_ptr() not in loaded)  # tied: loaded once
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", sorted(unexpected)), ("mis-shaped", sorted(shapes))) if keys]
    if problems:
        raise CheckpointError(f"{directory / 'model.safetensors'} does not fit its spec; " + "; ".join(problems))


def model_ranks(model: torch.nn.Module) -> int:
    ep = expert_parallel_of(model)
    return 1 if ep is None else ep.size


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict: every pool tensor gathered over the group (every rank calls)."""
    # FSDP2-sharded weights come back whole (`full_tensor` is a collective: every rank, same order)
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    for name, pool in sharded_pools(model).items():
        for key, param in pool.named_parameters(recurse=False):
            parts = [torch.empty_like(param) for _ in range(pool.parallel.size)]
            dist.all_gather(parts, param.detach().contiguous(), group=pool.parallel.group)
            state[f"{name}.{key}"] = torch.cat(parts)
    return state


@contextmanager
def single_process_config(model):
    """The model's config reading `expert_parallel: 1` while it is written."""
    spec = model.config.spec
    model.config.spec = with_expert_parallel(ModelSpec.model_validate(spec), 1).model_dump(mode="json")
    try:
        yield
    finally:
        model.config.spec = spec
