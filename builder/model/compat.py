"""What differs between the transformers releases moebuild supports (see `moebuild.versions`).

transformers 5.24 renamed the KV cache from `past_key_values` to `cache`: in every model output
class, in the attention modules' and masking functions' keywords, and in what `generate` passes
to `forward` and reads back from its output. Older releases use `past_key_values` throughout.
The name is read off transformers' own signature, not its version string, so a backport or a
patched release is handled too.
"""

from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask

CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
"""The keyword transformers' attention, masking and generation code use for the KV cache."""


def cache_kwargs(cache) -> dict:
    """`{CACHE_NAME: cache}`, for calls into transformers' attention modules and masking functions."""
    return {CACHE_NAME: cache}
