"""Training a spec through its stages: LLaVA-format data (`data`), the loop with exact resume
(`loop`), and a synthetic image+text task for tests and first runs (`synthetic`)."""

from __future__ import annotations

from pathlib import Path

import torch

from moebuild.schemas.base import did_you_mean
from moebuild.train.data import DataError, Encoder, encode_file
from moebuild.train.loop import Run, Settings, TrainError, check_resumable, checkpoints

__all__ = ["DataError", "Run", "Settings", "TrainError", "check", "load_model", "train", "train_checked"]


def load_model(source: str, seed: int = 0):
    """A model directory (config.json there) loads its weights; a spec or preset name builds fresh ones."""
    from moebuild.model.vlm import MoEVLMForConditionalGeneration, build

    if (Path(source) / "config.json").is_file():
        return MoEVLMForConditionalGeneration.from_pretrained(source)
    return build(source, seed=seed)


def check(model, run_dir: str | Path, settings: Settings, resume: bool = False) -> list[Path]:
    """What `train` refuses before it touches anything (a TrainError), for a caller that prints
    before training starts (then `train_checked`); returns the run's checkpoints."""
    run_dir, spec = Path(run_dir), model.spec
    found = checkpoints(run_dir)
    if resume and not found:
        raise TrainError(f"{run_dir}: no checkpoint to resume from (run without --resume to start)")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        verb = "--resume continues it" if found else "choose an empty or new directory"
        raise TrainError(f"{run_dir} exists and is not empty ({verb})")
    stages = [s.name for s in spec.training.stages] if spec.training else []
    if settings.stage is not None:
        if settings.stage not in stages:
            raise TrainError(f"no training stage {settings.stage!r}; the spec has {', '.join(stages) or 'none'}"
                             f"{did_you_mean(settings.stage, stages)}")
        try:
            model.apply_stage(settings.stage)
        except ValueError as exc:  # a trainable pattern that matches no parameter of the built model
            raise TrainError(str(exc)) from None
    if spec.tokens.eos is None:
        raise TrainError(f"{spec.name}: tokens.eos is null, and training ends every answer with it (so the "
                         "model learns to stop); set tokens.eos")
    if resume:
        check_resumable(spec, run_dir, found[-1], settings)
    return found


def train(source, data: str | Path, run_dir: str | Path, settings: Settings, *, resume: bool = False,
          image_folder: str | Path | None = None, progress=None) -> Run:
    """Train `source` (a model, model directory, spec or preset) on `data` into `run_dir`."""
    model = source if hasattr(source, "spec") else load_model(str(source), settings.seed)
    found = check(model, run_dir, settings, resume)
    return train_checked(model, data, run_dir, settings, resume_from=found[-1] if resume else None,
                         image_folder=image_folder, progress=progress)


def train_checked(model, data: str | Path, run_dir: str | Path, settings: Settings, *, resume_from: Path | None,
                  image_folder: str | Path | None = None, progress=None) -> Run:
    """`train` once `check` has passed: `resume_from` is the checkpoint it returned last (None: a fresh run)."""
    from moebuild.model.tokenizer import load_tokenizer
    from moebuild.registry import build_processor

    run_dir, spec, resume = Path(run_dir), model.spec, resume_from is not None
    try:
        tokenizer = load_tokenizer(spec)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    processor = None if spec.text_only else build_processor(spec)
    encoder = Encoder(tokenizer, processor, spec.image_token_id, settings.max_length)
    examples = encode_file(Path(data), encoder, image_folder)
    if settings.batch_size > len(examples):  # a batch would hold one record several times
        raise TrainError(f"--batch-size {settings.batch_size} is more than the {len(examples)} records of {data}")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = Run(model, examples, Path(data), run_dir, settings, tokenizer.pad_token_id)
        if resume:
            run.resume(resume_from)  # restores the RNG the run's router noise draws from
        else:
            torch.manual_seed(settings.seed)  # a fresh run's noise is a function of its seed, as on resume
        run.train(progress)
    except BaseException:
        if not resume and not checkpoints(run_dir):  # nothing to resume: leave the directory as it was
            (run_dir / "log.jsonl").unlink(missing_ok=True)
            if created and not any(run_dir.iterdir()):
                run_dir.rmdir()
        raise
    return run
