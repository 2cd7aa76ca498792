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
            derived = derived_fields(ModelSpec.model_validate(spec))
            differ = disagreements(derived, kwargs)
            if differ:  # the spec builds the modules: a config saying otherwise would describe another model
                raise ValueError(f"the config disagrees with its own spec: {differ}")
            kwargs.update(derived)
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


def derived_fields(spec: ModelSpec) -> dict:
    """The config fields transformers reads that the spec decides."""
    lang = spec.language
    return {"tie_word_embeddings": lang.tie_word_embeddings, "pad_token_id": spec.tokens.pad,
            "bos_token_id": spec.tokens.bos, "eos_token_id": spec.tokens.eos,
            "image_token_id": spec.image_token_id,  # None for a text-only model
            "vocab_size": lang.vocab_size, "hidden_size": lang.hidden_size, "num_hidden_layers": lang.num_layers}


def disagreements(derived: dict, config: dict) -> str:
    """`config`'s fields that differ from the spec's `derived_fields`, as text ("" when none)."""
    return ", ".join(f"{key} {config[key]!r} (its spec: {value!r})" for key, value in derived.items()
                     if key in config and config[key] != value)
