"""moebuild: declarative Mixture-of-Experts vision-language models.

`import moebuild` is cheap (no torch, no transformers): the spec API loads at once, the
model API on first use. It warns once (UntestedVersionWarning) when an installed dependency is
outside the range pyproject.toml declares as tested. transformers' Auto classes learn the `moebuild` model type when the model
module first loads (any of `build`, `build_module`, `MoEVLMForConditionalGeneration`...).
"""

from importlib import import_module

from moebuild.spec.errors import SpecError
from moebuild.spec.loading import load_spec
from moebuild.spec.presets import list_presets
from moebuild.versions import UntestedVersionWarning, warn_if_untested

_LAZY = {
    "build": "moebuild.model.vlm",
    "build_module": "moebuild.registry",
    "build_processor": "moebuild.registry",
    "summarize": "moebuild.accounting",
    "MoEVLMConfig": "moebuild.model.vlm",
    "MoEVLMForConditionalGeneration": "moebuild.model.vlm",
    "MoEVLMOutput": "moebuild.model.vlm",
    "MoELayerOutput": "moebuild.moe.layer",
    "trace": "moebuild.tracing",
    "RoutingTrace": "moebuild.tracing",
}

__all__ = ["SpecError", "UntestedVersionWarning", "list_presets", "load_spec", *_LAZY]

warn_if_untested()


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moebuild' has no attribute {name!r}")
