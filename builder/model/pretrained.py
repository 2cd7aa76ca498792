"""Load `pretrained:` checkpoints (local directories, safetensors only) into a freshly built model.

The language checkpoint is a transformers *ForCausalLM of the same family, so its keys match the
decoder's names one to one, except in MoE layers: there the dense FFN is upcycled into every
expert of each `init: upcycle` pool (Komatsuzaki et al. 2023, as MoE-LLaVA's stage 3 does), and
routers and non-upcycled pools keep their random init. Every other key must match exactly:
missing, unexpected and mis-shaped keys are all named in one error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from moebuild.moe.experts import ExpertPool
from moebuild.moe.layer import MoELayer
from moebuild.schemas import ModelSpec
from moebuild.spec.loading import PICKLES_REFUSED

# Dense FFN tensor names in a transformers checkpoint -> how they stack into a pool.
_GATED_FFN = ("gate_proj", "up_proj", "down_proj")
_PLAIN_FFN = ("fc1", "fc2")


class CheckpointError(ValueError):
    """A pretrained checkpoint that does not fit the spec."""


def validated_spec(data, where: str) -> ModelSpec:
    """The spec a checkpoint's config describes, or a CheckpointError naming `where`, the key path
    and the problem (a config has no file positions for the located errors `moebuild validate` gives)."""
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        path = ".".join(str(part) for part in error["loc"]) or "the spec"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise CheckpointError(f"{where}: the spec it describes is not valid: {path}: {error['msg']}{more}") from None


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local checkpoint directory (one file or shards); pickles are never read."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{path}: not a local checkpoint directory")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(directory.glob("*.safetensors"))]
    if not files:
        pickles = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
        raise CheckpointError(f"{path}: no .safetensors files ({PICKLES_REFUSED if pickles else 'only safetensors weights are loaded'})")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(directory / name))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{directory / name}: not a readable safetensors file ({exc})") from None
    return state


def load_pretrained_parts(model, spec: ModelSpec) -> None:
    if spec.vision is not None and spec.vision.pretrained:
        load_vision(model.vision, spec.vision.pretrained)
    if spec.language.pretrained:
        load_language(model.language, spec.language.pretrained)


def load_vision(tower, path: str) -> None:
    # transformers 5 saves a CLIPVisionModel / SiglipVisionModel flat (`embeddings.*`); released
    # CLIP / SigLIP checkpoints keep the tower under `vision_model.` beside `text_model.`.
    state = read_safetensors_dir(path)
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    _load_exact(tower.vision_model, state, path)


def load_language(language, path: str) -> None:
    state = read_safetensors_dir(path)
    if language.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for i, layer in enumerate(language.layers):
        if not _is_moe(layer.mlp):
            continue
        prefix = f"model.layers.{i}.mlp."
        dense = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        used: set[str] = set()
        for name, pool in layer.mlp.pools.items():
            if pool.upcycle:
                for key, tensor in _upcycled(pool, dense, path, prefix).items():
                    state[f"{prefix}pools.{name}.{key}"] = tensor
                used |= {n for n in dense if n.split(".")[0] in (_GATED_FFN if pool.gated else _PLAIN_FFN)}
        # Dense FFN tensors no pool took stay in `state`, so they are reported as unexpected.
        state.update({prefix + n: t for n, t in dense.items() if n not in used})
    own = language.state_dict()
    random_ok = {k for k in own if ".mlp." in k and k not in state and _under_moe(language, k)}
    _load_exact(language, state, path, allowed_missing=random_ok)


def _is_moe(mlp) -> bool:
    return isinstance(mlp, MoELayer)


def _under_moe(language, key: str) -> bool:
    layer = int(key.split(".")[2])
    return _is_moe(language.layers[layer].mlp)


def _upcycled(pool: ExpertPool, dense: dict[str, torch.Tensor], path: str, prefix: str) -> dict[str, torch.Tensor]:
    """The pool's tensors with every expert a copy of the dense FFN."""
    names = _GATED_FFN if pool.gated else _PLAIN_FFN
    missing = [f"{prefix}{n}.weight" for n in names if f"{n}.weight" not in dense]
    if missing:
        raise CheckpointError(f"{path}: cannot upcycle, missing {', '.join(missing)}")
    E = pool.num_experts
    if pool.gated:
        w_in = torch.cat([dense["gate_proj.weight"], dense["up_proj.weight"]], dim=0)
        tensors = {"gate_up_proj": w_in, "down_proj": dense["down_proj.weight"]}
        biases = {"gate_up_proj_bias": ("gate_proj.bias", "up_proj.bias"), "down_proj_bias": ("down_proj.bias",)}
    else:
        tensors = {"up_proj": dense["fc1.weight"], "down_proj": dense["fc2.weight"]}
        biases = {"up_proj_bias": ("fc1.bias",), "down_proj_bias": ("fc2.bias",)}
    for key, parts in biases.items():
        if getattr(pool, key, None) is None:
            continue
        if not all(p in dense for p in parts):
            raise CheckpointError(f"{path}: the pool has {key} but {prefix}* has no FFN bias")
        tensors[key] = torch.cat([dense[p] for p in parts])
    return {key: t.unsqueeze(0).expand(E, *t.shape).contiguous() for key, t in tensors.items()}


def _load_exact(module, state: dict[str, torch.Tensor], path: str, allowed_missing=frozenset()) -> None:
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and k not in allowed_missing)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path} does not fit the spec; " + "; ".join(problems))
    module.load_state_dict(state, strict=False)
