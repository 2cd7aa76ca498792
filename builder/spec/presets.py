"""The zoo: presets shipped as package data, ``moebuild/zoo/<family>/<name>.yaml``.

A preset's name is its file stem and its family is its folder; names are unique across families.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from moebuild.spec.errors import did_you_mean


@cache
def _zoo() -> dict[str, Path]:
    root = resources.files("moebuild.zoo")
    found: dict[str, Path] = {}
    for family in sorted(root.iterdir(), key=lambda p: p.name):
        if not family.is_dir() or family.name.startswith(("_", ".")):
            continue
        for entry in sorted(family.iterdir(), key=lambda p: p.name):
            if entry.name.endswith(".yaml"):
                found[entry.name[: -len(".yaml")]] = Path(str(entry))
    return found


def list_presets() -> list[str]:
    """Names of every zoo preset, sorted."""
    return sorted(_zoo())


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``; LookupError (with a did-you-mean) when there is none."""
    try:
        return _zoo()[name]
    except KeyError:
        raise LookupError(unknown_preset_message(name)) from None


def preset_family(name: str) -> str:
    """The family (zoo folder) of preset ``name``, e.g. ``moe_llava``."""
    return preset_path(name).parent.name


def unknown_preset_message(name: str) -> str:
    hint = did_you_mean(name, _zoo()) or f" (presets: {', '.join(list_presets()) or 'none'})"
    return f"unknown preset '{name}'{hint}"
