"""Spec loading: YAML file or preset -> ``base:`` chain merged -> overrides -> ``${...}`` -> ModelSpec.

Every problem on the way becomes a located Diagnostic (see spec/errors.py) and all of a spec's
problems are raised together as one SpecError. ``${a.b}`` references (interpolation.py) are
resolved after merging and overrides, as in Hydra, so ``${language.hidden_size}`` sees the
final value.

This module imports neither torch nor transformers: ``moebuild validate`` must stay fast.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq
from ruamel.yaml.representer import RoundTripRepresenter

from moebuild.files import unreadable
from moebuild.spec import presets
from moebuild.spec.diagnose import declares, validation_diagnostics
from moebuild.spec.errors import Diagnostic, SpecError, SpecPath, did_you_mean
from moebuild.spec.interpolation import interpolate
from moebuild.spec.overrides import apply_overrides
from moebuild.spec.tree import Node, Pos, merge, node_at, read_yaml, to_plain

_YAML_SUFFIXES = (".yaml", ".yml")
MAX_BASES = 32


def load_spec(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()):
    """The validated ``ModelSpec`` for a preset name or a YAML file, with overrides applied.

    Raises SpecError listing every problem, each at the place it was written.
    """
    spec, root, problems = _validated(_model_spec(), name_or_path, overrides)
    if spec is not None:
        problems += _pretrained_problems(spec, root) + _tokenizer_problems(spec, root)
    _raise_if_any(problems)
    return spec


def load_as(model: type, name_or_path: str | os.PathLike, overrides: Sequence[str] = ()):
    """Like load_spec, validating with another pydantic model (a spec section, a test model)."""
    spec, _, problems = _validated(model, name_or_path, overrides)
    _raise_if_any(problems)
    return spec


def _validated(model: type, name_or_path, overrides) -> tuple[Any, Node, list[Diagnostic]]:
    root, problems, poisoned = _resolve(model, name_or_path, overrides)
    data = to_plain(root)
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        found = validation_diagnostics(exc, model, root, data)
        problems += [d for d in found if not any(d.path[: len(p)] == p for p in poisoned)]
        spec = None
    return spec, root, problems


def _pretrained_problems(spec, root: Node) -> list[Diagnostic]:
    """A `pretrained:` directory must exist and hold safetensors weights (never pickles)."""
    problems = []
    for section in ("vision", "language"):
        path = getattr(getattr(spec, section), "pretrained", None)  # a text-only spec has no vision
        if path is None:
            continue
        where = (section, "pretrained")
        node, _ = node_at(root, where)
        directory = Path(path)
        if not directory.is_dir():
            message = "is a file; give the checkpoint's directory" if directory.exists() else "no such directory"
        elif not any(directory.glob("*.safetensors")):
            pickles = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
            message = "holds no .safetensors files" + (f" ({PICKLES_REFUSED})" if pickles else "")
        else:
            continue
        problems.append(node.pos.error(where, f"{path!r}: {message}"))
    return problems


_TOKENIZER_VOCABULARIES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")
"""Vocabulary files of transformers' slow tokenizers; each needs a tokenizer_config.json or config.json naming
the class that reads it (without one AutoTokenizer cannot pick a class, or builds a one-token tokenizer)."""


def _tokenizer_problems(spec, root: Node) -> list[Diagnostic]:
    """A `tokenizer:` directory must hold what AutoTokenizer loads: a tokenizer.json (complete on its own), or
    a vocabulary file and the config naming its class. Checked here, without transformers, so that
    validate catches what trace and train would fail on."""
    if spec.tokenizer is None:
        return []
    directory = Path(spec.tokenizer)
    if not directory.is_dir():
        if directory.exists():
            message = "is a file; give the tokenizer's directory"
        else:
            message = "no such directory"
            if not directory.is_absolute() and not spec.tokenizer.startswith("."):  # reads like a hub name
                message += " (tokenizer: names a local directory; moebuild downloads nothing)"
    elif (directory / "tokenizer.json").is_file():
        return []
    else:
        vocabularies = [name for name in _TOKENIZER_VOCABULARIES if (directory / name).is_file()]
        configs = [name for name in ("tokenizer_config.json", "config.json") if (directory / name).is_file()]
        if vocabularies and configs:
            return []
        if vocabularies:
            message = f"holds {vocabularies[0]} but no tokenizer_config.json or config.json naming its tokenizer class"
        else:
            message = ("holds no tokenizer.json and no vocabulary file (" + ", ".join(_TOKENIZER_VOCABULARIES) + ")"
                       + (f"; {configs[0]} alone is not a tokenizer" if configs else ""))
    node, _ = node_at(root, ("tokenizer",))
    return [node.pos.error(("tokenizer",), f"{spec.tokenizer!r}: {message}")]


PICKLES_REFUSED = ("only pickled .bin/.pt weights, which moebuild never loads (unpickling can run code): convert them "
                   "once, where you trust them, with safetensors.torch.save_file or transformers' save_pretrained")


def resolve_spec(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The merged, overridden and interpolated spec as plain data, before validation."""
    root, problems, _ = _resolve(_model_spec(), name_or_path, overrides)
    _raise_if_any(problems)
    return to_plain(root)


def dump_yaml(data: Any) -> str:
    """Block-style YAML for plain data: ``type`` first, lists of scalars on one line, ``null`` spelled out."""
    yaml = YAML()
    yaml.width = 100
    yaml.Representer = _Representer
    out = io.StringIO()
    yaml.dump(_flow_leaf_lists(data), out)
    return out.getvalue()


class _Representer(RoundTripRepresenter):
    """Writes None as ``null`` (round-trip YAML leaves it empty, which reads oddly)."""


_Representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))


def _flow_leaf_lists(data: Any) -> Any:
    if isinstance(data, dict):
        keys = sorted(data, key=lambda k: k != "type")  # stable: only moves `type` to the front
        return {k: _flow_leaf_lists(data[k]) for k in keys}
    if isinstance(data, (list, tuple)):
        items = [_flow_leaf_lists(v) for v in data]
        seq = CommentedSeq(items)
        if not any(isinstance(v, (dict, list)) for v in items):
            seq.fa.set_flow_style()
        return seq
    return data


def _raise_if_any(problems: list[Diagnostic]) -> None:
    if problems:
        raise SpecError(sorted(problems, key=lambda d: (d.file, d.line or 0, d.col or 0)))


def _model_spec() -> type:
    from moebuild.schemas import ModelSpec

    return ModelSpec


def _resolve(model: type, name_or_path, overrides) -> tuple[Node, list[Diagnostic], list[SpecPath]]:
    """The merged tree, the non-fatal problems, and paths whose values are known bad."""
    problems: list[Diagnostic] = []
    overrides = (overrides,) if isinstance(overrides, str) else tuple(overrides)
    path, shown = _locate_top(name_or_path)
    root = _load_chain(path, shown, [], problems)
    apply_overrides(root, overrides, problems, lambda tree, path: declares(model, path, to_plain(tree)))
    poisoned = interpolate(root, problems)
    return root, problems, poisoned


def _locate_top(name_or_path: str | os.PathLike) -> tuple[Path, str]:
    text = os.fspath(name_or_path)
    if _looks_like_path(name_or_path):
        hint = "" if os.path.lexists(text) else _preset_hint(text)
        if hint:
            raise SpecError([Pos(text).error((), f"no such file{hint}")])
        return Path(text), text
    try:
        return presets.preset_path(text), text
    except LookupError as exc:
        raise SpecError([Pos(text).error((), f"no such file, and {exc.args[0]}")]) from None


def _looks_like_path(name: str | os.PathLike) -> bool:
    """A path object, or a name with a separator or a YAML suffix, or a bare name that exists here;
    but a bare preset name means the preset unless a regular file has that name (a directory named
    after a preset must not hide it; ``./name`` is always the path)."""
    text = os.fspath(name)
    if not isinstance(name, str) or "/" in text or os.sep in text or text.endswith(_YAML_SUFFIXES):
        return True
    return os.path.exists(text) and (os.path.isfile(text) or text not in presets.list_presets())


def _preset_hint(name: str) -> str:
    """``"; did you mean the preset 'x'?"`` for a YAML file name that does not exist and is close to a preset's."""
    stem = Path(name).name
    if not stem.endswith(_YAML_SUFFIXES):
        return ""
    close = did_you_mean(stem.rsplit(".", 1)[0], presets.list_presets())
    return close.replace("did you mean", "did you mean the preset")


def _load_chain(path: Path, shown: str, chain: list[tuple[Path, str]], problems: list[Diagnostic]) -> Node:
    """``path`` merged over its ``base:`` chain; read errors and bad bases are fatal."""
    try:
        root = read_yaml(path, shown)
    except SpecError as exc:
        raise SpecError(problems + exc.diagnostics) from None
    base = root.value.pop("base", None)
    if base is None or base.value is None:
        return merge(None, root, (), problems)
    target, target_shown = _base_target(base, path, problems)
    chain = [*chain, (path.resolve(), shown)]
    seen = [p for p, _ in chain]
    if target.resolve() in seen:
        names = [s for _, s in chain[seen.index(target.resolve()):]] + [target_shown]
        raise SpecError(problems + [base.pos.error(("base",), "cyclic base: " + " -> ".join(names))])
    if len(chain) >= MAX_BASES:
        raise SpecError(problems + [base.pos.error(("base",), f"more than {MAX_BASES} specs inherit from one another")])
    parent = _load_chain(target, target_shown, chain, problems)
    return merge(parent, root, (), problems)


def _base_target(base: Node, including: Path, problems: list[Diagnostic]) -> tuple[Path, str]:
    def fail(message: str) -> SpecError:
        return SpecError(problems + [base.pos.error(("base",), message)])

    name = base.value
    if not isinstance(name, str) or not name:
        raise fail("expected a preset name or a relative path to a YAML file")
    if "/" in name or os.sep in name or name.endswith(_YAML_SUFFIXES):
        if not name.endswith(_YAML_SUFFIXES):
            raise fail(f"base file '{name}' must be a .yaml or .yml file")
        if os.path.isabs(name):
            raise fail(f"base file '{name}' must be a path relative to this spec, not an absolute one")
        path = including.parent / name
        why = unreadable(path)
        if why is not None:
            hint = "" if os.path.lexists(path) else _preset_hint(name)
            raise fail(f"base file '{name}' {why} (looked at {_display(path)}){hint}")
        return path, _display(path)
    try:
        path = presets.preset_path(name)
    except LookupError as exc:
        raise fail(exc.args[0]) from None
    return path, _display(path)


def _display(path: Path) -> str:
    """Relative to the current directory when the file is under it, else absolute."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        relative = os.pardir
    return str(path.resolve()) if relative.startswith(os.pardir) else relative
