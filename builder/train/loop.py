"""`moebuild train`: one stage of a spec's training recipe on one machine.

A plain loop rather than transformers' `Trainer`: Trainer's checkpoints keep the optimiser, the
scheduler and the RNG as pickles (`optimizer.pt`, `rng_state.pth`), and moebuild loads no pickle.
Here every checkpoint is a model directory (`from_pretrained` loads it) with its training state
beside it in safetensors and JSON, so `--resume` continues at the same step with the same loss
curve: the batch of step s is a function of (seed, s), and the RNG that draws router noise is
saved and restored. The model also trains unchanged under a user's own `Trainer`.

Run directory: `checkpoint-<step>/` (model.safetensors, config.json, spec.yaml, routing.json, and
`training_state/` with optimizer.safetensors, rng.safetensors, state.json) and `log.jsonl`, one
line per logged step: the loss, the LM loss, every balancing term and each MoE layer's expert
load per route and modality. A checkpoint's routing.json is `moebuild trace`'s, over the logged
training batches since the previous checkpoint (or since the run started or resumed): how the
routing moved between checkpoints (a collapsing expert, a modality drifting) without a trace run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moebuild.output import write_model_dir
from moebuild.tracing.collect import Recorder, RoutingTrace

STATE = "training_state"


class TrainError(ValueError):
    """A run that cannot start or resume: says what and how to fix it."""


@dataclass(frozen=True)
class Settings:
    stage: str | None
    steps: int
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 100
    log_every: int = 10
    max_length: int = 1024


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The examples of step `step` (0-based): consecutive slots of per-epoch seeded permutations."""
    return [_epoch_order(n, seed, slot // n)[slot % n] for slot in range(step * batch_size, (step + 1) * batch_size)]


@functools.lru_cache(maxsize=2)  # a batch spans one epoch or two (batch <= dataset): each drawn once
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("checkpoint-*") if (p / STATE / "state.json").is_file())


def check_resumable(spec, run_dir: Path, last: Path, settings: Settings) -> None:
    """Refuse (TrainError) to continue from `last` unless it is the run's newest checkpoint, the run
    has steps left and the spec and settings are the ones it was started with."""
    newest = max((p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir()), default=last)
    if newest != last:
        raise TrainError(f"{newest}: not a complete checkpoint (no {STATE}/state.json); remove it to resume "
                         f"from {last.name}")
    state = json.loads((last / STATE / "state.json").read_text())
    ours = asdict(settings)
    changed = [k for k in ("stage", "batch_size", "lr", "weight_decay", "max_grad_norm", "seed", "max_length")
               if state["settings"][k] != ours[k]]
    if changed:
        was = ", ".join(f"{k}={state['settings'][k]!r}" for k in changed)
        raise TrainError(f"{last}: the run was started with {was}; resume with the same settings")
    if settings.steps <= state["step"]:
        raise TrainError(f"{last}: the run is at step {state['step']} already, and --steps counts all the run's "
                         f"steps; give more than {state['step']}")
    saved = type(spec).model_validate(json.loads((last / "config.json").read_text())["spec"])
    differs = _differences(saved.model_dump(mode="json"), spec.model_dump(mode="json"))
    if differs:
        shown = ", ".join(differs[:3]) + (f" and {len(differs) - 3} more" if len(differs) > 3 else "")
        raise TrainError(f"{last}: the spec differs from the one the run was started with ({shown}); "
                         "resume with the same spec")


def _differences(a, b, path: str = "") -> list[str]:
    """Dotted key paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(a.keys() | b.keys(), key=str)
                for d in _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "the whole spec"]


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _optimizer(model, settings: Settings) -> tuple[torch.optim.Optimizer, list[str]]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=settings.lr, weight_decay=settings.weight_decay)
    return optimizer, names


def _save_optimizer(optimizer: torch.optim.Optimizer, names: list[str], path: Path) -> None:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{names[index]}::{key}"] = value.reshape(-1) if value.ndim == 0 else value
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def _load_optimizer(optimizer: torch.optim.Optimizer, names: list[str], path: Path) -> None:
    tensors = load_file(path)
    state = optimizer.state_dict()
    by_index: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("::", 1)
        if name not in names:
            raise TrainError(f"{path}: optimiser state for {name}, which this stage does not train")
        by_index.setdefault(names.index(name), {})[field] = value.reshape(()) if field == "step" else value
    state["state"] = by_index
    optimizer.load_state_dict(state)


def _log_record(step: int, out, lm_loss: float) -> dict:
    record = {"step": step, "loss": out.loss.item(), "lm_loss": lm_loss}
    record |= {name: value.item() for name, value in out.aux_losses.items()}
    if out.router_stats:
        record["load"] = {str(layer.layer_idx): {route: {modality: s["load"].tolist() for modality, s in groups.items()}
                                                 for route, groups in layer.stats.items()}
                          for layer in out.router_stats}
    return record


class Run:
    """One stage trained into `run_dir`, from a model (fresh) or from the run's last checkpoint (resume)."""

    def __init__(self, model, examples, data_path: Path, run_dir: Path, settings: Settings, pad_token_id: int):
        self.model, self.examples, self.run_dir, self.settings = model, examples, Path(run_dir), settings
        self.pad_token_id = pad_token_id
        self.data_digest = _digest(data_path)
        if settings.stage is not None:
            model.apply_stage(settings.stage)
        self.optimizer, self.names = _optimizer(model, settings)
        if not self.names:
            raise TrainError(f"stage {settings.stage!r} trains no parameter")
        self.step = 0
        self._new_window()

    def resume(self, last: Path) -> None:
        """Continue from checkpoint `last`, the run's latest, which `check_resumable` accepted (the
        caller's `moebuild.train.check` runs it, before anything is loaded or printed)."""
        state = json.loads((last / STATE / "state.json").read_text())
        if state["data_sha256"] != self.data_digest:
            raise TrainError(f"{last}: the training data changed since the run started")
        from moebuild.model.vlm import MoEVLMForConditionalGeneration

        weights = MoEVLMForConditionalGeneration.from_pretrained(last).state_dict()
        self.model.load_state_dict(weights, strict=True)
        _load_optimizer(self.optimizer, self.names, last / STATE / "optimizer.safetensors")
        torch.set_rng_state(load_file(last / STATE / "rng.safetensors")["cpu"])
        self.step = state["step"]

    def save(self) -> Path:
        target = self.run_dir / f"checkpoint-{self.step:06d}"

        def write(directory: Path) -> None:
            self.model.save_pretrained(directory)
            (directory / STATE).mkdir()
            _save_optimizer(self.optimizer, self.names, directory / STATE / "optimizer.safetensors")
            save_file({"cpu": torch.get_rng_state()}, directory / STATE / "rng.safetensors")
            state = {"step": self.step, "settings": asdict(self.settings), "data_sha256": self.data_digest}
            (directory / STATE / "state.json").write_text(json.dumps(state, indent=1) + "\n")
            (directory / "routing.json").write_text(self.routing.to_json() + "\n")

        write_model_dir(target, write, force=target.exists())
        self._new_window()
        return target

    def _new_window(self) -> None:
        self.routing = RoutingTrace(model_name=self.model.spec.name)  # of the steps since the last checkpoint

    def train(self, progress=None) -> list[dict]:
        """Steps from the current one to settings.steps; returns the logged records."""
        from moebuild.train.data import collate

        s, model = self.settings, self.model
        model.train()
        log_path = self.run_dir / "log.jsonl"
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= self.step] \
            if log_path.exists() else []
        log_path.write_text("".join(line + "\n" for line in kept))  # a resumed run rewrites what followed its checkpoint
        records = []
        while self.step < s.steps:
            batch = collate([self.examples[i] for i in batch_indices(self.step, s.batch_size, len(self.examples), s.seed)],
                            self.pad_token_id)
            logged = (self.step + 1) % s.log_every == 0 or self.step + 1 == s.steps
            # traced on the logged steps only: the trace reads each router's choices on the host
            with Recorder(model, self.routing, top1=False).record() if logged else contextlib.nullcontext():
                out = model(**batch, output_router_stats=logged)
            self.routing.batches += logged
            if not math.isfinite(out.loss.item()):
                raise TrainError(f"step {self.step + 1}: the loss is {out.loss.item()}; lower --lr")
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            model.update_balancing()
            self.step += 1
            if logged:
                record = _log_record(self.step, out, out.lm_loss.item())
                records.append(record)
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
            if progress is not None:
                progress(self.step, out.loss.item())
            if self.step % s.save_every == 0 or self.step == s.steps:
                self.save()
        return records
