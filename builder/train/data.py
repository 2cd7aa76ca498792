"""LLaVA-format training data: records in, token ids, labels and pixels out.

A record is `{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}` (image optional; its path relative to the data file or to
`image_folder`). Each record becomes bos, then per turn `USER: {human}\\nASSISTANT: ` (labels
masked) and `{gpt}` + eos (trained), LLaVA's plain two-role template. `<image>` in a human turn
becomes the model's image placeholder tokens, masked too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moebuild.files import read_text, unreadable
from moebuild.model.tokenizer import IMAGE_PLACEHOLDER as IMAGE
from moebuild.model.tokenizer import encode_prompt
from moebuild.schemas.base import did_you_mean

IGNORE = -100
ROLES = {"human": "USER: ", "gpt": ""}
RECORD_KEYS = ("id", "image", "conversations")
TURN_KEYS = ("from", "value")


class DataError(ValueError):
    """Training data that cannot be read: the file, the record and what is wrong."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # [V, 3, H, W], every view of the record's one image
    grid: tuple[int, int] | None = None  # its tile grid, with a tiling tower


def read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs: `where` is `file: record i` in a JSON list, `file:line` in JSONL."""
    text = read_text(path, DataError)
    if str(path).endswith(".jsonl"):
        records = [(f"{path}:{number}", _json(line, f"{path}:{number}"))
                   for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        listed = _json(text, str(path))
        records = [(f"{path}: record {i}", r) for i, r in enumerate(listed)] if isinstance(listed, list) else None
    if not records:
        raise DataError(f"{path}: expected a non-empty list of LLaVA records")
    return records


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None


def _unknown_keys(record: dict, known: tuple[str, ...], where: str) -> None:
    """A key close to a known one is a typo that would drop data silently (`imagee`): refused.
    Other keys are the dataset's own metadata (`source`, `model`...) and are left alone."""
    for key in record:
        hint = did_you_mean(key, known) if key not in known else ""
        if hint:
            raise DataError(f"{where}: unknown key {key!r}{hint}")


class Encoder:
    """Turns records into Examples with the spec's tokenizer and image processor."""

    def __init__(self, tokenizer, processor, image_token_id: int | None, max_length: int):
        self.tokenizer, self.processor = tokenizer, processor
        self.image_token_id, self.max_length = image_token_id, max_length

    def encode(self, record, where: str, image_root: Path) -> Example:
        if isinstance(record, dict):  # a typo first: 'conversation' would otherwise read as a missing list
            _unknown_keys(record, RECORD_KEYS, where)
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list) or not record["conversations"]:
            raise DataError(f"{where}: expected an object with a non-empty 'conversations' list")
        image = record.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(f"{where}: 'image' must be a path (a string), not {type(image).__name__}")
        processed = self._pixels(image, where, image_root) if image is not None else None
        tokens_per_image = processed.num_image_tokens[0] if processed is not None else 0
        ids, labels = [], []
        if self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE)
        placeholders = 0
        for i, turn in enumerate(record["conversations"]):
            role, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
            if isinstance(turn, dict):
                _unknown_keys(turn, TURN_KEYS, f"{where}: conversations[{i}]")
            if role not in ROLES or not isinstance(value, str):
                raise DataError(f"{where}: conversations[{i}]: expected {{'from': 'human' | 'gpt', 'value': text}}")
            if role == "human":
                placeholders += value.count(IMAGE)
                prompt = self._prompt(ROLES[role] + value + "\nASSISTANT: ", tokens_per_image, where)
                ids += prompt
                labels += [IGNORE] * len(prompt)
            else:
                answer = self.tokenizer.encode(value) + [self.tokenizer.eos_token_id]
                ids += answer
                labels += answer
        if placeholders != (image is not None):
            raise DataError(f"{where}: {placeholders} {IMAGE} placeholders for {int(image is not None)} image "
                            f"(a record with an image has one {IMAGE} in a human turn)")
        if len(ids) > self.max_length:
            if image is not None and ids[self.max_length:].count(self.image_token_id):
                raise DataError(f"{where}: {len(ids)} tokens; cutting to max_length {self.max_length} would cut the image")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if processed is None:
            return Example(ids, labels, None)
        return Example(ids, labels, processed.pixel_values, processed.tile_grids[0] if processed.tile_grids else None)

    def _prompt(self, text: str, tokens_per_image: int, where: str) -> list[int]:
        if IMAGE in text and self.image_token_id is None:
            raise DataError(f"{where}: {IMAGE} in a text-only model's data")
        try:
            return encode_prompt(self.tokenizer, text, tokens_per_image)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None

    def _pixels(self, image, where: str, image_root: Path):
        from PIL import Image, UnidentifiedImageError

        if self.processor is None:
            raise DataError(f"{where}: an image in a text-only model's data")
        path = image_root / str(image)
        why = unreadable(path)
        if why is not None:
            raise DataError(f"{where}: image {str(path)!r}: {why}")
        try:
            with Image.open(path) as picture:
                return self.processor([picture.convert("RGB")])
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{where}: image {str(path)!r}: {exc}") from None


def encode_file(path: Path, encoder: Encoder, image_folder: Path | None = None) -> list[Example]:
    root = Path(image_folder) if image_folder is not None else Path(path).parent
    examples = []
    for where, record in read_records(path):
        examples.append(encoder.encode(record, where, root))
        if all(label == IGNORE for label in examples[-1].labels):  # its loss would be 0/0: a nan that ends the run
            why = "no gpt turn" if all(t.get("from") != "gpt" for t in record["conversations"]) else \
                f"cutting to max_length {encoder.max_length} leaves no answer token"
            raise DataError(f"{where}: nothing to learn from ({why})")
    return examples


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (padding ignored), pixel_values (and
    image_grids with a tiling tower) if any."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    grids = [e.grid for e in examples if e.grid is not None]
    if grids:
        batch["image_grids"] = grids
    return batch
