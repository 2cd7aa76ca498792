"""The model's config: it carries the resolved spec as plain data, the single source of truth;
`from_pretrained` rebuilds the modules from it before loading the safetensors weights."""

from __future__ import annotations

from functools import cached_property

from transformers import PretrainedConfig

from moebuild.registry import language_hf_config
from moebuild.schemas import ModelSpec


class MoEVLMConfig(PretrainedConfig):
    """Carries the resolved spec; everything else is derived from it."""

    model_type = "moebuild"

    def __init__(self, spec: dict | None = None, **kwargs):
        kwargs.pop("text_config", None)  # derived from the spec, never read back
        self.spec = spec
        if spec is not None:
            parsed = ModelSpec.model_validate(spec)
            lang = parsed.language
            kwargs.setdefault("tie_word_embeddings", lang.tie_word_embeddings)
            kwargs.setdefault("pad_token_id", parsed.tokens.pad)
            kwargs.setdefault("bos_token_id", parsed.tokens.bos)
            kwargs.setdefault("eos_token_id", parsed.tokens.eos)
            self.image_token_id = parsed.image_token_id  # None for a text-only model
            self.vocab_size = lang.vocab_size
            self.hidden_size = lang.hidden_size
            self.num_hidden_layers = lang.num_layers
        super().__init__(**kwargs)

    @cached_property
    def parsed_spec(self) -> ModelSpec:
        return ModelSpec.model_validate(self.spec)

    @cached_property
    def text_config(self) -> PretrainedConfig | None:
        """The language family's own config: what transformers' cache and attention code read.

        None for a config without a spec: transformers 5.16-5.17 build one (`MoEVLMConfig()`) while
        saving, and look for its text config."""
        return None if self.spec is None else language_hf_config(self.parsed_spec.language)

    def to_dict(self) -> dict:
        out = super().to_dict()
        for derived in ("parsed_spec", "text_config"):
            out.pop(derived, None)
        return out
