"""Model inputs checked before the forward: a ValueError saying what is wrong, never silent garbage.

Out-of-vocabulary ids would index past the embedding (an assert on CUDA), image placeholders
without pictures would run as text, pictures without placeholders would be dropped, and a
mask or labels of another shape would broadcast or misalign; each is refused here instead.

Legend: B batch, S sequence (this call's tokens), P past tokens in the cache, V views (images or tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class InputRules:
    vocab_size: int
    hidden_size: int
    image_token_id: int | None  # None: a text-only model
    image_size: int | None
    image_tokens_per_view: int


IGNORE_INDEX = -100  # transformers' label for a position without loss


def check_inputs(rules: InputRules, input_ids: Tensor | None, inputs_embeds: Tensor | None,
                 pixel_values: Tensor | None, attention_mask: Tensor | None, labels: Tensor | None,
                 past: int) -> None:
    """Raise ValueError for inputs the model cannot run correctly; `past` = tokens already cached."""
    if input_ids is None and inputs_embeds is None:
        raise ValueError("give input_ids (or inputs_embeds)")
    if input_ids is not None:
        B, S = _check_ids(rules, input_ids)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != rules.hidden_size:
            raise ValueError(f"inputs_embeds must be [batch, sequence, {rules.hidden_size}], "
                             f"got shape {tuple(inputs_embeds.shape)}")
        B, S = inputs_embeds.shape[:2]
        if B == 0 or S == 0:
            raise ValueError(f"inputs_embeds is empty (shape {tuple(inputs_embeds.shape)})")
    if attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) != (B, past + S):
        cached = f" ({past} cached + {S} new)" if past else ""
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + S)}: "
                         f"one entry per token{cached}")
    if labels is not None:
        _check_labels(rules, labels, (B, S))
    if pixel_values is not None:
        _check_pixels(rules, pixel_values)
    if input_ids is not None and rules.image_token_id is not None:
        _check_placeholders(rules, input_ids, pixel_values, past)
    elif pixel_values is not None:
        raise ValueError("pixel_values go with input_ids (their placeholders say where each picture goes), "
                         "not with inputs_embeds")


def _check_labels(rules: InputRules, labels: Tensor, shape: tuple[int, int]) -> None:
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {shape} like input_ids")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids (-100 where no loss), got {labels.dtype}")
    bad_BS = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= rules.vocab_size)
    if bad_BS.any():
        b, s = (int(i) for i in bad_BS.nonzero()[0])
        raise ValueError(f"labels[{b}, {s}] is {int(labels[b, s])}, outside the vocabulary (ids 0 to "
                         f"{rules.vocab_size - 1}, or {IGNORE_INDEX} where no loss is taken)")
    if bool((labels[:, 1:] == IGNORE_INDEX).all()):  # the first label is never predicted
        raise ValueError(f"every label after the first is {IGNORE_INDEX}: no token to predict, so the loss "
                         "would be 0/0 (nan)")


def _check_ids(rules: InputRules, input_ids: Tensor) -> tuple[int, int]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one sequence "
                         "of at least one token")
    low, high = (int(v) for v in torch.aminmax(input_ids))  # one pass (this runs on every decode step)
    if low < 0 or high >= rules.vocab_size:
        outside_BS = (input_ids < 0) | (input_ids >= rules.vocab_size)
        b, s = (int(i) for i in outside_BS.nonzero()[0])
        raise ValueError(f"input_ids[{b}, {s}] is {int(input_ids[b, s])}, outside the vocabulary "
                         f"(ids 0 to {rules.vocab_size - 1})")
    return tuple(input_ids.shape)


def _check_pixels(rules: InputRules, pixel_values: Tensor) -> None:
    if rules.image_size is None:
        raise ValueError("this is a text-only model (its spec has no vision section): it takes no pixel_values")
    side = rules.image_size
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() != 4 or shape[1:] != (3, side, side) or shape[0] == 0:
        raise ValueError(f"pixel_values must be [images, 3, {side}, {side}] (RGB at the tower's resolution; "
                         f"moebuild.build_processor(spec) makes them), got shape {shape}")
    if not pixel_values.dtype.is_floating_point:
        raise ValueError(f"pixel_values must be floating point (normalised by the processor), got {pixel_values.dtype}")


def _check_placeholders(rules: InputRules, input_ids: Tensor, pixel_values: Tensor | None, past: int) -> None:
    placeholders = int((input_ids == rules.image_token_id).sum())
    decoding = past > 0 and input_ids.shape[1] == 1  # a sampled placeholder id is a text token there
    if placeholders and pixel_values is None and not decoding:
        raise ValueError(f"input_ids hold {placeholders} image placeholder tokens (id {rules.image_token_id}) "
                         "but no pixel_values were given")
    if pixel_values is not None and not placeholders:
        raise ValueError(f"pixel_values hold {pixel_values.shape[0]} image(s) but input_ids have no image "
                         f"placeholder tokens (id {rules.image_token_id}, {rules.image_tokens_per_view} per "
                         "untiled image)")
