"""The tested dependency range: pyproject.toml declares it, .ci/floor.txt pins its floor, and
`import moebuild` warns when an installed dependency is outside it."""

from __future__ import annotations

import warnings
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from moebuild import versions

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def test_the_floor_constraints_pin_every_declared_floor():
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "floor.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    for name, requirement in declared().items():
        floors = [s.version for s in requirement.specifier if s.operator == ">="]
        assert floors, f"{name} has no floor"
        assert name in pins, f".ci/floor.txt does not pin {name}"
        assert Version(pins[name]) == Version(floors[0]), f"{name}: floor {floors[0]}, pinned {pins[name]}"
    assert set(pins) == set(declared())


def test_an_untested_release_is_named_with_the_tested_range(monkeypatch):
    real = versions.metadata.version
    monkeypatch.setattr(versions.metadata, "version", lambda name: "5.99.0" if name == "transformers" else real(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        versions.warn_if_untested()
    (warning,) = caught
    assert warning.category is versions.UntestedVersionWarning
    assert str(warning.message).startswith("moebuild is tested with transformers<5.25,>=5.15, but transformers "
                                           "5.99.0 is installed")


def test_the_installed_environment_is_inside_the_tested_range():
    assert versions.untested_dependencies() == []
