"""A byte-level tokenizer for specs that name no tokenizer: byte b -> id b + 3, pad 0, bos 1, eos 2.

The `<image>` placeholder in a prompt becomes the spec's `image_token_id` once; the caller expands
it to the image's token count (the processor's `num_image_tokens`), as the model expects.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
PAD, BOS, EOS = 0, 1, 2
OFFSET = 3


class ByteTokenizer:
    def __init__(self, vocab_size: int, image_token_id: int | None = None):
        if vocab_size < 256 + OFFSET:
            raise ValueError(f"a byte-level tokenizer needs vocab_size >= {256 + OFFSET}, got {vocab_size}")
        if image_token_id is not None and OFFSET <= image_token_id < 256 + OFFSET:
            raise ValueError(f"image_token_id {image_token_id} collides with the byte ids {OFFSET}..{255 + OFFSET}")
        self.vocab_size, self.image_token_id = vocab_size, image_token_id

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, each `<image>` as one image_token_id (no bos/eos added)."""
        ids: list[int] = []
        for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                if self.image_token_id is None:
                    raise ValueError("the prompt has an <image> placeholder but the model has no image_token_id")
                ids.append(self.image_token_id)
            ids += [b + OFFSET for b in part.encode("utf-8")]
        return ids

    def decode(self, ids) -> str:
        out, text = bytearray(), []
        for i in ids:
            if OFFSET <= i < 256 + OFFSET:
                out.append(i - OFFSET)
            elif i == self.image_token_id:
                text.append(out.decode("utf-8", errors="replace") + IMAGE_PLACEHOLDER)
                out = bytearray()
        return "".join(text) + out.decode("utf-8", errors="replace")
