"""Checkpoint directories in and out: `import_checkpoint` turns a foreign checkpoint directory
(config.json + safetensors) into a moebuild model directory, `export_checkpoint` the reverse. The
per-format work is the format module's (`moebuild.convert.<format>`); this module reads and
writes directories, with moebuild's output rules (staged, never replacing what moebuild did not write).
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

from moebuild.model.pretrained import CheckpointError, read_safetensors_dir, validated_spec
from moebuild.schemas import ModelSpec

FORMATS = {  # format name -> module
    "hf": "moebuild.convert.hf",
    "deepseek_vl2": "moebuild.convert.deepseek_vl2",
    "moe_llava": "moebuild.convert.moe_llava",
    "ltdr": "moebuild.convert.ltdr",  # MoE-LLaVA's module under LTDR's name
}
EXPORTS = ("hf", "deepseek_vl2", "moe_llava", "ltdr")


def format_module(name: str):
    if name not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {name!r}; known: {', '.join(FORMATS)}")
    try:
        return import_module(FORMATS[name])
    except ModuleNotFoundError:
        raise CheckpointError(f"checkpoint format {name!r} is not available in this moebuild version") from None


def read_config(directory: Path) -> dict:
    if Path(directory).exists() and not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory (a checkpoint directory holds config.json and safetensors)")
    return _read_json(Path(directory) / "config.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise CheckpointError(f"{path}: no config.json (a checkpoint directory holds config.json and safetensors)") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def spec_of(fmt: str, checkpoint_dir: Path, name: str | None = None) -> ModelSpec:
    """The spec a foreign checkpoint's config.json describes."""
    module = format_module(fmt)
    config = read_config(checkpoint_dir)
    for filename, key in getattr(module, "COMPANIONS", {}).items():  # configs the format keeps beside config.json
        path = Path(checkpoint_dir) / filename
        if path.is_file() and key not in config:
            config[key] = _read_json(path)
    where = Path(checkpoint_dir) / "config.json"
    try:
        data = module.spec_from_config(config, name=name or Path(checkpoint_dir).name)
    except CheckpointError:
        raise
    except KeyError as exc:
        raise CheckpointError(f"{where}: no {exc.args[0]!r}, which a {fmt} config has") from None
    except (TypeError, AttributeError, ValueError) as exc:  # a key of the wrong type or shape
        raise CheckpointError(f"{where}: not a {fmt} config this moebuild reads ({type(exc).__name__}: {exc})") from None
    return validated_spec(data, str(where))


def load_foreign(fmt: str, checkpoint_dir: Path, spec: ModelSpec | None = None):
    """(spec, moebuild model) from a foreign checkpoint; `spec` overrides the one its config implies."""
    from moebuild.model.vlm import build

    spec = spec or spec_of(fmt, checkpoint_dir)
    state = format_module(fmt).to_moebuild(read_safetensors_dir(checkpoint_dir), spec)
    model = build(spec)  # initialised, so buffers outside the state dict (rotary tables) are right
    model.load_state_dict(state, strict=True)
    return spec, model


def import_checkpoint(fmt: str, checkpoint_dir, output, *, spec: ModelSpec | None = None, force: bool = False) -> ModelSpec:
    """Write a foreign checkpoint directory as a moebuild model directory; returns its spec."""
    from moebuild.output import check_output, write_model_dir

    check_output(Path(output), force, (Path(checkpoint_dir),))  # before reading gigabytes
    spec, model = load_foreign(fmt, Path(checkpoint_dir), spec)
    write_model_dir(Path(output), model.save_pretrained, force=force, inputs=(Path(checkpoint_dir),))
    return spec


def export_checkpoint(fmt: str, model_dir, output, *, force: bool = False) -> list[str]:
    """Write a moebuild model directory in a foreign format (config.json + model.safetensors);
    returns the parts of the spec the foreign config does not carry (training-only terms)."""
    from safetensors.torch import save_file

    from moebuild.output import check_output, write_model_dir

    check_output(Path(output), force, (Path(model_dir),))
    module = format_module(fmt)
    ours = read_config(Path(model_dir))
    if ours.get("model_type") != "moebuild" or "spec" not in ours:
        raise CheckpointError(f"{model_dir}: not a moebuild model directory (its config.json has no moebuild spec)")
    spec = validated_spec(ours["spec"], str(Path(model_dir) / "config.json"))
    state = read_safetensors_dir(model_dir)  # the files as written: no model is built
    config, state = module.from_moebuild(state, spec)

    def write(directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({key: value.contiguous() for key, value in state.items()}, directory / "model.safetensors",
                  metadata={"format": "pt"})

    write_model_dir(Path(output), write, force=force, inputs=(Path(model_dir),))
    return module.untranslated(spec) if hasattr(module, "untranslated") else []
