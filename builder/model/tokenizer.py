"""Tokenizers for prompts and training text: the spec's own (`tokenizer:`, a local transformers
tokenizer directory) or, when it names none, a built-in byte-level one for tests and toy runs.

The byte-level tokenizer needs no files: byte b is id b + 3 after three specials (pad 0, bos 1,
eos 2, the spec's `tokens` defaults), so any vocabulary of at least 259 ids (the micro presets
have 512) reads any UTF-8 text. The image placeholder is the spec's `image_token_id`, which must
lie outside the byte range.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

SPECIALS = 3  # pad, bos, eos
BYTES = 256
IMAGE_PLACEHOLDER = "<image>"


def encode_with_placeholders(text: str, image_token_id: int | None, encode: Callable[[str], list[int]]) -> list[int]:
    """`encode` applied to the text between `<image>` placeholders, each placeholder one image_token_id.
    Text that itself encodes to the image id is refused: the model would take it for a picture's token."""
    ids: list[int] = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            if image_token_id is None:
                raise ValueError("the prompt has an <image> placeholder but the model has no image_token_id")
            ids.append(image_token_id)
        part_ids = encode(part) if part else []
        if image_token_id is not None and image_token_id in part_ids:
            raise ValueError(f"the text {part[:40]!r} encodes to the image token id {image_token_id}; set tokens.image "
                             "to an id the tokenizer does not give text")
        ids += part_ids
    return ids


def encode_prompt(tokenizer, text: str, tokens_per_image: int) -> list[int]:
    """The ids of `text` with each `<image>` expanded to `tokens_per_image` image ids (no bos/eos)."""
    ids: list[int] = []
    for token in tokenizer.encode(text):
        ids += [token] * tokens_per_image if token == tokenizer.image_token_id else [token]
    return ids


class ByteTokenizer:
    def __init__(self, vocab_size: int, image_token_id: int | None = None, *, pad: int = 0, bos: int = 1, eos: int = 2):
        if vocab_size < SPECIALS + BYTES:
            raise ValueError(f"the byte-level tokenizer needs a vocabulary of at least {SPECIALS + BYTES} ids, "
                             f"the spec has {vocab_size}; name a tokenizer directory in the spec (tokenizer: ...)")
        if image_token_id is not None and SPECIALS <= image_token_id < SPECIALS + BYTES:
            raise ValueError(f"image token id {image_token_id} is a byte id of the byte-level tokenizer "
                             f"({SPECIALS}..{SPECIALS + BYTES - 1}); set tokens.image outside that range")
        self.vocab_size, self.image_token_id = vocab_size, image_token_id
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad, bos, eos

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, each `<image>` as one image_token_id (no bos/eos added); the caller
        expands it to the picture's token count."""
        return encode_with_placeholders(text, self.image_token_id, lambda part: [b + SPECIALS for b in part.encode("utf-8")])

    def decode(self, ids) -> str:
        text, run = [], bytearray()
        for i in ids:
            if SPECIALS <= i < SPECIALS + BYTES:
                run.append(i - SPECIALS)
            elif i == self.image_token_id:
                text.append(run.decode("utf-8", errors="replace") + IMAGE_PLACEHOLDER)
                run = bytearray()
        return "".join(text) + run.decode("utf-8", errors="replace")


class HFTokenizer:
    """A local transformers tokenizer, with the spec's special ids."""

    def __init__(self, directory: str, spec):
        from transformers import AutoTokenizer

        path = Path(directory)
        if not path.is_dir():
            raise ValueError(f"tokenizer: {directory!r} is not a local tokenizer directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never runs a file's code
        if len(self.tokenizer) > spec.language.vocab_size:
            raise ValueError(f"tokenizer {directory} has {len(self.tokenizer)} ids, more than the spec's vocab_size "
                             f"{spec.language.vocab_size}")
        self.image_token_id = spec.image_token_id
        self.pad_token_id, self.bos_token_id, self.eos_token_id = spec.tokens.pad, spec.tokens.bos, spec.tokens.eos

    def encode(self, text: str) -> list[int]:
        """As ByteTokenizer.encode: each `<image>` one image_token_id, whatever the vocabulary makes of the text."""
        return encode_with_placeholders(text, self.image_token_id,
                                        lambda part: self.tokenizer.encode(part, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(spec) -> ByteTokenizer | HFTokenizer:
    """The spec's tokenizer, or the byte-level one when it names none."""
    if spec.tokenizer is not None:
        return HFTokenizer(spec.tokenizer, spec)
    t = spec.tokens
    return ByteTokenizer(spec.language.vocab_size, spec.image_token_id, pad=t.pad, bos=t.bos, eos=t.eos)
