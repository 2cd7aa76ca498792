"""The tested dependency range, read from moebuild's own installed metadata (pyproject.toml).

`import moebuild` warns once when an installed dependency is outside the range moebuild was
tested with (README, "Tested versions"): transformers' internals change between minor releases
(5.24 renamed the KV cache in every output class), so an untested release may break a forward.
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion


class UntestedVersionWarning(UserWarning):
    """An installed dependency is outside the range moebuild is tested with."""


def untested_dependencies() -> list[tuple[str, str, str]]:
    """(package, installed version, tested range) for every dependency outside its range."""
    try:
        requirements = metadata.requires("moebuild") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return []
    found = []
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra, or another platform's
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        try:
            tested = requirement.specifier.contains(installed, prereleases=True)
        except InvalidVersion:
            continue
        if not tested:
            found.append((requirement.name, installed, str(requirement.specifier)))
    return found


def warn_if_untested() -> None:
    for name, installed, tested in untested_dependencies():
        warnings.warn(
            f"moebuild is tested with {name}{tested}, but {name} {installed} is installed: it may break "
            f"(pip install '{name}{tested}' gives a tested release)",
            UntestedVersionWarning,
            stacklevel=3,
        )
