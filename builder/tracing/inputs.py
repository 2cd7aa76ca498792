"""The inputs of `moebuild trace`: samples from a JSONL file or one image + prompt, batched.

JSONL: one object per line, {"prompt": "... <image> ...", "image": "path"}; "image" is optional
and relative to the JSONL file's directory. A prompt with an image but no `<image>` gets one at
its start. Prompts are tokenized by the tokenizer training uses (the spec's, or the byte-level one
when it names none: moebuild.model.tokenizer.load_tokenizer), as they are written (no chat
template): its bos first, each `<image>` expanded to the image's token count; sequences are
right-padded with its pad id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from moebuild.files import read_text, unreadable
from moebuild.model.tokenizer import IMAGE_PLACEHOLDER, encode_prompt, load_tokenizer
from moebuild.schemas.base import did_you_mean

KEYS = ("prompt", "image")


class InputError(ValueError):
    """A problem with the trace inputs, stated in one line."""


@dataclass
class Sample:
    prompt: str
    image: Image.Image | None = None


def load_image(path: Path) -> Image.Image:
    why = unreadable(path)
    if why is not None:
        raise InputError(f"{path}: {why}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


def read_jsonl(path: Path) -> list[Sample]:
    samples = []
    lines = read_text(path, InputError).splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputError(f'{path}:{number}: each line needs a "prompt" string')
        unknown = sorted(record.keys() - set(KEYS))
        if unknown:
            raise InputError(f"{path}:{number}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], KEYS)} "
                             f"(a line holds {' and '.join(map(repr, KEYS))})")
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise InputError(f'{path}:{number}: "image" must be a path (a string), not {type(image).__name__}')
        samples.append(Sample(record["prompt"], None if image is None else load_image(path.parent / image)))
    if not samples:
        raise InputError(f"{path}: no samples")
    return samples


def batches(samples: list[Sample], model, batch_size: int):
    """Yield (model keyword arguments, the batch's images) for each batch of samples."""
    from moebuild.registry import build_processor

    tokenizer = load_tokenizer(model.spec)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    processor = None
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        rows, images, grids = [], [], []
        for sample in chunk:
            prompt = sample.prompt
            if sample.image is not None and IMAGE_PLACEHOLDER not in prompt:
                prompt = IMAGE_PLACEHOLDER + "\n" + prompt
            wanted = prompt.count(IMAGE_PLACEHOLDER)
            if wanted != (sample.image is not None):
                raise InputError(f"prompt {sample.prompt[:40]!r} has {wanted} <image> placeholder(s) "
                                 f"but {int(sample.image is not None)} image")
            tokens_per_image = 0
            if sample.image is not None:
                if processor is None:
                    processor = build_processor(model.spec)
                processed = processor([sample.image])
                images.append((sample.image, processed))
                grids += processed.tile_grids or []
                tokens_per_image = processed.num_image_tokens[0]
            try:
                rows.append(bos + encode_prompt(tokenizer, prompt, tokens_per_image))
            except ValueError as exc:
                raise InputError(f"prompt {sample.prompt[:40]!r}: {exc}") from None
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            batch["pixel_values"] = torch.cat([p.pixel_values for _, p in images])
            if grids:
                batch["image_grids"] = grids
        yield batch, [image for image, _ in images]
