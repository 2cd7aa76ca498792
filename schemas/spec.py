"""The root of a moebuild spec and the rules that span several sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moebuild.schemas.base import (
    CrossFieldError,
    Path,
    SpecModel,
    TokenId,
    did_you_mean,
)
from moebuild.schemas.connector import ConnectorSpec
from moebuild.schemas.families import FAMILIES
from moebuild.schemas.language import LanguageSpec
from moebuild.schemas.moe import MoESpec, moe_layer_indices
from moebuild.schemas.training import TRAINABLE_ROOTS, TrainingSpec
from moebuild.schemas.vision import VisionSpec


class TokenIdsSpec(SpecModel):
    """Special token ids the model needs without a tokenizer."""

    image: TokenId | None = None
    """Placeholder id replaced by image features; null = vocab_size - 1."""
    pad: TokenId = 0
    """Padding id."""
    bos: TokenId | None = 1
    """Beginning-of-sequence id."""
    eos: TokenId | None = 2
    """End-of-sequence id (generation stops on it)."""


class ModelSpec(SpecModel):
    """A Mixture-of-Experts vision-language model, or a text-only language model (no vision, no connector)."""

    moebuild_version: Literal[1] = 1
    """Version of the spec language."""
    name: str
    """Model name."""
    description: str | None = None
    """Free text: what the model is and where its numbers come from."""
    base: str | None = None
    """Spec this one inherits from (preset name or relative path); merged by the loader, null once resolved."""
    vision: VisionSpec | None = None
    """Vision encoder; null = a text-only model (then connector is null too)."""
    connector: ConnectorSpec | None = None
    """Projector from vision features to language embeddings; null exactly when vision is null."""
    language: LanguageSpec
    """Language decoder."""
    moe: MoESpec | None = None
    """MoE layers; null = a dense model."""
    tokenizer: str | None = None
    """Local transformers tokenizer directory; null = the built-in byte-level tokenizer (byte b -> id b + 3)."""
    tokens: TokenIdsSpec = Field(default_factory=TokenIdsSpec)
    """Special token ids."""
    training: TrainingSpec | None = None
    """Staged training recipe."""

    @property
    def text_only(self) -> bool:
        return self.vision is None

    @property
    def image_token_id(self) -> int | None:
        """The image placeholder id; None for a text-only model, where every id is text."""
        if self.text_only:
            return None
        return self.language.vocab_size - 1 if self.tokens.image is None else self.tokens.image

    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers that are MoE layers."""
        return [] if self.moe is None else moe_layer_indices(self.moe.layers, self.language.num_layers)

    @model_validator(mode="after")
    def _cross_field_rules(self):
        problems = (_modality_rules(self) + _language_rules(self) + _token_rules(self) + _moe_rules(self)
                    + _training_rules(self))
        if problems:
            raise CrossFieldError(problems)
        return self


def _modality_rules(spec: ModelSpec) -> list[tuple[Path, str]]:
    """A vision tower needs a connector and the reverse; a text-only model has no image tokens."""
    if (spec.vision is None) != (spec.connector is None):
        given, missing = ("vision", "connector") if spec.connector is None else ("connector", "vision")
        return [((given,), f"a {given} section needs a {missing} section (or neither, for a text-only model)")]
    if spec.vision is None and spec.tokens.image is not None:
        return [(("tokens", "image"), "a text-only model (no vision section) has no image placeholder id")]
    if spec.vision is None and spec.moe is not None:
        scoped = [(("moe", "routes", i, "tokens"), route.tokens) for i, route in enumerate(spec.moe.routes)]
        scoped += [(("moe", "balancing", i, "tokens"), term.tokens) for i, term in enumerate(spec.moe.balancing)]
        return [(at, "a text-only model (no vision section) has no image tokens") for at, tokens in scoped
                if tokens == "image"]
    return []


def _language_rules(spec: ModelSpec) -> list[tuple[Path, str]]:
    lang, facts = spec.language, FAMILIES[spec.language.type]
    at = ("language", "attention", "type")
    if lang.attention.type == "mla" and not facts.mla:
        mla = " or ".join(name for name, f in FAMILIES.items() if f.mla)
        return [(at, f"mla attention needs language type {mla}, got {lang.type}")]
    if lang.attention.type != "mla" and not facts.mha:
        return [(at, f"{lang.type} attention is mla only, got {lang.attention.type}")]
    return []


BYTE_TOKENIZER_IDS = range(3, 3 + 256)
"""Ids the built-in byte tokenizer (`tokenizer: null`) gives text: byte b is id b + 3, after pad, bos and eos
(moebuild.model.tokenizer, which schemas/ does not import: it is builder code)."""


def _token_rules(spec: ModelSpec) -> list[tuple[Path, str]]:
    vocab = spec.language.vocab_size
    problems = [
        (("tokens", name), f"must be < language.vocab_size ({vocab}), got {value}")
        for name, value in spec.tokens.model_dump().items()
        if value is not None and value >= vocab
    ]
    return problems or [*_special_token_rules(spec), *_image_token_rules(spec)]


def _special_token_rules(spec: ModelSpec) -> list[tuple[Path, str]]:
    """With the byte tokenizer, pad, bos and eos need ids that no text has: a byte read as eos ends an
    answer, one read as pad is masked out. (pad == eos is fine: real models share it.) Below the byte
    range's end the byte tokenizer refuses to run, so a small imported model keeps its ids."""
    ids, vocab = BYTE_TOKENIZER_IDS, spec.language.vocab_size
    if spec.tokenizer is not None or vocab < ids.stop:
        return []
    free = f"below {ids.start}" + (f" or {ids.stop}..{vocab - 1}" if vocab > ids.stop else "")
    return [(("tokens", name), f"{value} is a byte id of the built-in byte tokenizer (tokenizer: null gives byte b "
                               f"the id b + 3, so text takes ids {ids.start}..{ids.stop - 1}); give tokens.{name} an "
                               f"id {free}, or name a tokenizer directory (tokenizer: ...)")
            for name in ("pad", "bos", "eos") if (value := getattr(spec.tokens, name)) in ids]


def _image_token_rules(spec: ModelSpec) -> list[tuple[Path, str]]:
    """The image placeholder needs an id that no special token and no text has: the model takes
    every occurrence of it for a picture's token."""
    image, vocab, t = spec.image_token_id, spec.language.vocab_size, spec.tokens
    if image is None:  # text-only
        return []
    if t.image is not None:
        at, what = ("tokens", "image"), str(image)
    else:
        at = ("language", "vocab_size")
        what = f"with tokens.image null the image placeholder is vocab_size - 1 = {image}, which"
    special = next((name for name in ("pad", "bos", "eos") if getattr(t, name) == image), None)
    if special is not None:
        return [(at, f"{what} is also tokens.{special}; the image placeholder needs an id of its own")]
    ids = BYTE_TOKENIZER_IDS
    # below the byte range's end the byte tokenizer refuses to run, so a defaulted id there is no collision
    if spec.tokenizer is None and image in ids and (t.image is not None or vocab >= ids.stop):
        if vocab > ids.stop:
            fix = f"set tokens.image outside that range (e.g. {vocab - 1})"
        else:
            there = " and set tokens.image there" if t.image is not None else ""
            fix = f"raise language.vocab_size past {ids.stop}{there}, or name a tokenizer directory (tokenizer: ...)"
        return [(at, f"{what} is a byte id of the built-in byte tokenizer (tokenizer: null gives byte b the id b + 3, "
                     f"so text takes ids {ids.start}..{ids.stop - 1}); {fix}")]
    return []


def _moe_rules(spec: ModelSpec) -> list[tuple[Path, str]]:
    moe = spec.moe
    if moe is None:
        return []
    problems = _layer_rules(moe, spec.language.num_layers)
    for i, route in enumerate(moe.routes):
        pool = moe.pools.get(route.pool)
        if pool is None:
            hint = did_you_mean(route.pool, moe.pools) or f" (pools: {', '.join(moe.pools)})"
            problems.append((("moe", "routes", i, "pool"), f"no pool named '{route.pool}'{hint}"))
        else:
            problems += _router_fits_pool(route.router, route.pool, pool.num_experts, ("moe", "routes", i, "router"))
        why = route.router.compares_tokens()
        if why and route.causal and route.tokens != "image":
            problems.append((("moe", "routes", i, "router", "type"),
                             f"{route.router.type} is not causal ({why}): on a route over {route.tokens} tokens a "
                             "causal language model sees later tokens in training; write causal: false on the "
                             "route to accept that, or route only image tokens"))
    used = {route.pool for route in moe.routes}
    if used <= moe.pools.keys():  # a misspelt pool name is reported once, above, not twice
        problems += [(("moe", "pools", name), f"pool '{name}' is not used by any route")
                     for name in moe.pools if name not in used]
    for name, pool in moe.pools.items():
        if pool.init == "upcycle" and pool.intermediate_size != spec.language.intermediate_size:
            problems.append((("moe", "pools", name, "init"),
                             f"upcycle copies the dense FFN, so intermediate_size must equal language.intermediate_size "
                             f"({spec.language.intermediate_size}), got {pool.intermediate_size}"))
    return problems + _balancing_rules(moe)


_EXPERT_COUNTS = ("top_k", "tail_top_k", "max_experts")
"""Router keys that count experts of the route's pool, whichever router type has them."""


def _router_fits_pool(router, pool_name: str, num_experts: int, at: Path) -> list[tuple[Path, str]]:
    problems = [
        (at + (key,), f"must be <= {num_experts} (pool '{pool_name}' has {num_experts} experts)")
        for key in _EXPERT_COUNTS
        if (getattr(router, key, None) or 0) > num_experts
    ]
    groups = getattr(router, "groups", None)
    if isinstance(groups, dict) and sum(groups.values()) != num_experts:
        problems.append((at + ("groups",), f"group sizes sum to {sum(groups.values())}, "
                                           f"but pool '{pool_name}' has {num_experts} experts"))
    elif groups is not None and not isinstance(groups, dict) and num_experts % groups.num_groups:
        problems.append((at + ("groups", "num_groups"), f"must divide the pool's {num_experts} experts "
                                                        f"(pool '{pool_name}'), got {groups.num_groups}"))
    return problems


def _layer_rules(moe: MoESpec, num_layers: int) -> list[tuple[Path, str]]:
    layers = moe.layers
    if isinstance(layers, list):
        problems, first = [], {}
        for i, index in enumerate(layers):
            if index >= num_layers:
                problems.append((("moe", "layers", i), f"layer {index} is past language.num_layers ({num_layers})"))
            elif first.setdefault(index, i) < i:
                problems.append((("moe", "layers", i), f"layer {index} is already listed at moe.layers[{first[index]}]"))
        return problems
    if not isinstance(layers, str) and layers.first_k_dense >= num_layers:
        return [(("moe", "layers", "first_k_dense"), f"must be < language.num_layers ({num_layers}), got {layers.first_k_dense}")]
    return []


def _balancing_rules(moe: MoESpec) -> list[tuple[Path, str]]:
    """A balancing term needs a routed (non-dense) route whose tokens overlap the term's tokens."""
    routed = {route.tokens for route in moe.routes if route.router.type != "dense"}
    problems = []
    for i, term in enumerate(moe.balancing):
        seen = routed if term.tokens == "all" else routed & {term.tokens, "all"}
        if not seen:
            problems.append((("moe", "balancing", i, "tokens"),
                             f"no routed (non-dense) route sees {term.tokens} tokens, so this term would be always 0"))
    return problems


def _training_rules(spec: ModelSpec) -> list[tuple[Path, str]]:
    if spec.training is None:
        return []
    problems = []
    if spec.tokens.eos is None:
        problems.append((("tokens", "eos"), "null, but the training stages end every answer with eos (so the model "
                                             "learns to stop); set it, or drop the training section"))
    first: dict[str, int] = {}
    for i, stage in enumerate(spec.training.stages):
        if first.setdefault(stage.name, i) < i:
            problems.append((("training", "stages", i, "name"),
                             f"stage '{stage.name}' is already named at training.stages[{first[stage.name]}]"))
        for j, pattern in enumerate(stage.trainable):
            root = pattern.split(".", 1)[0]
            if root not in TRAINABLE_ROOTS:
                problems.append((("training", "stages", i, "trainable", j),
                                 f"unknown component '{root}' (expected one of {', '.join(TRAINABLE_ROOTS)})"
                                 f"{did_you_mean(root, TRAINABLE_ROOTS)}"))
            elif root == "moe" and spec.moe is None:
                problems.append((("training", "stages", i, "trainable", j), "the spec has no moe section"))
            elif root in ("vision", "connector") and spec.vision is None:
                problems.append((("training", "stages", i, "trainable", j),
                                 f"a text-only model (no vision section) has no {root}"))
    return problems
