"""What every converter needs: reading a foreign state dict so that nothing is silently skipped,
and checking the result against the model the spec builds, with every problem in one error."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from moebuild.model.pretrained import CheckpointError


class TensorSource:
    """A foreign state dict read key by key: `take` records what was asked for and not there, and
    `left_over` is what nobody asked for. A mapping is total when both are empty."""

    def __init__(self, state: dict[str, torch.Tensor], what: str = "the checkpoint"):
        self.state, self.what = state, what
        self.taken: set[str] = set()
        self.missing: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.state:
            self.missing.append(key)
            return None
        self.taken.add(key)
        return self.state[key]

    def skip(self, keys: Iterable[str]) -> None:
        """Tensors the target deliberately has no place for (the caller documents which and why)."""
        self.taken.update(keys)

    def left_over(self) -> list[str]:
        return sorted(self.state.keys() - self.taken)

    def check_total(self, spec_name: str) -> None:
        """Raise CheckpointError unless every tensor asked for was there and every one was asked for
        (an export: the source is moebuild's own state dict)."""
        if self.missing or self.left_over():
            raise CheckpointError(f"the moebuild model does not fit spec {spec_name}; missing: {self.missing}; "
                                  f"left over: {self.left_over()}")


def expected_shapes(spec) -> dict[str, torch.Size]:
    """The state dict of the model `spec` builds, as names and shapes (built on meta: no memory)."""
    from moebuild.model.vlm import build

    return {key: value.shape for key, value in build(spec, device="meta").state_dict().items()}


HEAD, EMBEDDING = "language.lm_head.weight", "language.model.embed_tokens.weight"


def in_moe_layer(key: str, moe_layers: set[int]) -> bool:
    """Whether moebuild tensor `key` is inside the FFN of one of `moe_layers` (converted per layer, not renamed)."""
    parts = key.split(".")
    return key.startswith("language.model.layers.") and int(parts[3]) in moe_layers and parts[4] == "mlp"


def take_renamed(source: TensorSource, spec, expected: dict[str, torch.Size], original_name: Callable[[str], str],
                 skip: Callable[[str], bool]) -> dict[str, torch.Tensor | None]:
    """Every tensor of the spec's model (`expected`) that `skip` leaves, taken under its original name;
    a tied head the checkpoint lacks is the embedding (save_pretrained writes the embedding alone)."""
    out = {key: source.take(original_name(key)) for key in expected if not skip(key)}
    head = original_name(HEAD)
    if spec.language.tie_word_embeddings and head not in source:
        source.missing.remove(head)
        out[HEAD] = out[EMBEDDING]
    return out


def check_complete(converted: dict[str, torch.Tensor | None], spec, source: TensorSource,
                   expected: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """`converted` with its None entries (made from missing tensors) gone, or one CheckpointError
    naming every tensor the source lacks, every one it has left over, every converted tensor whose
    shape the spec's model does not have, and every name the model has that nothing produced.
    `expected`: `expected_shapes(spec)`, where the caller has it already (each builds a meta model)."""
    expected = expected_shapes(spec) if expected is None else expected
    made = {key: value for key, value in converted.items() if value is not None}
    misshaped = [f"{key} {tuple(value.shape)} (the spec's model has {tuple(expected[key])})"
                 for key, value in sorted(made.items()) if key in expected and value.shape != expected[key]]
    unproduced = sorted(key for key in expected.keys() - converted.keys())
    unknown = sorted(made.keys() - expected.keys())
    problems = [f"{label}: {', '.join(keys)}" for label, keys in (
        (f"missing from {source.what}", sorted(source.missing)),
        (f"left over in {source.what}", source.left_over()),
        ("mis-shaped", misshaped),
        ("not produced by the conversion", unproduced),
        ("not in the spec's model", unknown),
    ) if keys]
    if problems:
        raise CheckpointError(f"{source.what} does not fit spec {spec.name}; " + "; ".join(problems))
    return made
