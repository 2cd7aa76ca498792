"""Spec data that remembers where every value came from, and the inheritance merge.

YAML is read with ruamel.yaml's round-trip loader, which keeps line/column of every key,
value and list item. Each value becomes a ``Node`` holding its position, so a value keeps
the file it came from through ``base:`` merges and overrides, and any later error can
name that place.

Merge rules (``base:`` and overrides): mappings merge key by key, lists and scalars replace,
a mapping whose ``type`` changes is replaced whole, ``key: !replace {...}`` replaces without
merging and ``key: !delete`` removes an inherited key.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from moebuild.errors import Diagnostic, SpecError, SpecPath

DELETE, REPLACE = "!delete", "!replace"


@dataclass(frozen=True)
class Pos:
    """A place in a file (1-based), or a whole file when ``line`` is None."""

    file: str
    line: int | None = None
    col: int | None = None

    def error(self, path: SpecPath, message: str) -> Diagnostic:
        return Diagnostic(self.file, self.line, self.col, tuple(path), message)


@dataclass
class Node:
    """A value (``dict[key, Node]``, ``list[Node]`` or a scalar) and where it was written."""

    value: Any
    pos: Pos
    key_pos: Pos | None = None  # where its key is written, for mapping entries
    tag: str | None = None  # DELETE / REPLACE until the merge consumes it

    def key_or_value_pos(self) -> Pos:
        return self.key_pos or self.pos


def read_yaml(path: Path, shown: str) -> Node:
    """Parse one YAML file into a Node tree; any problem raises a one-line SpecError."""
    whole = Pos(shown)
    if path.is_dir():
        raise SpecError([whole.error((), "is a directory, not a YAML spec file")])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([whole.error((), "no such file")]) from None
    except UnicodeDecodeError:
        raise SpecError([whole.error((), "not a UTF-8 text file")]) from None
    except OSError as exc:
        raise SpecError([whole.error((), f"cannot read: {exc.strerror}")]) from None
    try:
        data = YAML().load(text)
    except MarkedYAMLError as exc:
        raise SpecError([_yaml_error(exc, shown)]) from None
    except YAMLError as exc:
        raise SpecError([Pos(shown, 1, 1).error((), f"not valid YAML: {exc}")]) from None
    if data is None:
        raise SpecError([Pos(shown, 1, 1).error((), "empty file; expected a mapping of spec keys")])
    if not isinstance(data, CommentedMap):
        found = describe_value(_scalar(data) if not isinstance(data, list) else data)
        raise SpecError([Pos(shown, 1, 1).error((), f"expected a mapping of spec keys, got {found}")])
    problems: list[Diagnostic] = []
    root = _from_ruamel(data, Pos(shown, 1, 1), None, shown, (), problems)
    if problems:
        raise SpecError(problems)
    return root


def read_value(text: str, at: Pos, problems: list[Diagnostic]) -> Node:
    """One YAML value written inline (an override's right-hand side) starting at ``at``."""
    data = YAML().load(text)
    node = _from_ruamel(data, at, None, at.file, (), problems)
    for _, sub in walk(node):
        sub.pos = _shift(sub.pos, at)
        sub.key_pos = sub.key_pos and _shift(sub.key_pos, at)
    return node


def _shift(pos: Pos, at: Pos) -> Pos:
    if pos is at or pos.line != 1:
        return pos
    return Pos(at.file, at.line, at.col + pos.col - 1)


def _yaml_error(exc: MarkedYAMLError, shown: str) -> Diagnostic:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    text = exc.problem or exc.context or "cannot parse"
    if exc.problem and exc.context:
        where = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        text += f" ({exc.context}{where})"
    return Pos(shown, line, col).error((), f"not valid YAML: {text}")


def _from_ruamel(value: Any, pos: Pos, key_pos: Pos | None, shown: str,
                 path: SpecPath, problems: list[Diagnostic]) -> Node:
    tag = _tag(value)
    if tag not in (None, DELETE, REPLACE):
        problems.append(pos.error(path, f"unknown tag '{tag}'; expected {DELETE} or {REPLACE}"))
    if isinstance(value, CommentedMap):
        children = {}
        for k, v in value.items():
            (kl, kc), (vl, vc) = value.lc.key(k), value.lc.value(k)
            key = _scalar(k)
            children[key] = _from_ruamel(v, Pos(shown, vl + 1, vc + 1), Pos(shown, kl + 1, kc + 1),
                                         shown, (*path, key), problems)
        return Node(children, pos, key_pos, tag)
    if isinstance(value, CommentedSeq):
        items = []
        for i, v in enumerate(value):
            line, col = value.lc.item(i)
            items.append(_from_ruamel(v, Pos(shown, line + 1, col + 1), None, shown, (*path, i), problems))
        return Node(items, pos, key_pos, tag)
    if tag == REPLACE:
        problems.append(pos.error(path, f"{REPLACE} applies to a mapping or a list"))
    if isinstance(value, TaggedScalar):
        return Node(None if tag == DELETE else value.value, pos, key_pos, tag)
    return Node(_scalar(value), pos, key_pos)


def _tag(value: Any) -> str | None:
    tag = getattr(value, "tag", None)
    tag = getattr(tag, "value", tag)
    return tag if isinstance(tag, str) and tag else None


def _scalar(value: Any) -> Any:
    """ruamel's scalar subclasses (ScalarFloat, HexInt, quoted strings...) as plain Python."""
    if value is None or isinstance(value, bool):
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    return str(value)


def from_plain(value: Any, pos: Pos, key_pos: Pos | None = None) -> Node:
    """A Node tree for plain data whose every value was written at ``pos``."""
    if isinstance(value, dict):
        return Node({_scalar(k): from_plain(v, pos, pos) for k, v in value.items()}, pos, key_pos)
    if isinstance(value, (list, tuple)):
        return Node([from_plain(v, pos) for v in value], pos, key_pos)
    return Node(_scalar(value), pos, key_pos)


def to_plain(node: Node) -> Any:
    if isinstance(node.value, dict):
        return {k: to_plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [to_plain(v) for v in node.value]
    return node.value


def walk(node: Node, path: SpecPath = ()) -> Iterator[tuple[SpecPath, Node]]:
    yield path, node
    if isinstance(node.value, dict):
        for k, child in node.value.items():
            yield from walk(child, (*path, k))
    elif isinstance(node.value, list):
        for i, child in enumerate(node.value):
            yield from walk(child, (*path, i))


def node_at(root: Node, path: SpecPath) -> tuple[Node, int]:
    """The deepest node along ``path`` and how many path items it took to reach it."""
    node = root
    for depth, key in enumerate(path):
        container = node.value
        if isinstance(container, dict) and key in container:
            node = container[key]
        elif isinstance(container, list) and isinstance(key, int) and -len(container) <= key < len(container):
            node = container[key]
        else:
            return node, depth
    return node, len(path)


def describe_value(value: Any) -> str:
    """How a value reads in a message: ``'abc'``, ``3``, ``null``, ``a mapping``, ``a list``."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def merge(base: Node | None, child: Node, path: SpecPath, problems: list[Diagnostic]) -> Node:
    """``child`` laid over ``base`` (either may come from any file); consumes the tags."""
    if (child.tag != REPLACE and base is not None and isinstance(child.value, dict)
            and isinstance(base.value, dict) and not _type_changed(base, child)):
        merged = dict(base.value)
        for key, sub in child.value.items():
            if sub.tag == DELETE:
                if merged.pop(key, None) is None:
                    problems.append(_nothing_to_delete(sub, (*path, key)))
                continue
            merged[key] = merge(merged.get(key), sub, (*path, key), problems)
        return Node(merged, child.pos, child.key_pos)
    return _untag(child, path, problems)


def _type_changed(base: Node, child: Node) -> bool:
    old, new = base.value.get("type"), child.value.get("type")
    return old is not None and new is not None and old.value != new.value


def _untag(node: Node, path: SpecPath, problems: list[Diagnostic]) -> Node:
    """``node`` with no base under it: a !delete here has nothing to delete."""
    if isinstance(node.value, dict):
        kept = {}
        for key, sub in node.value.items():
            if sub.tag == DELETE:
                problems.append(_nothing_to_delete(sub, (*path, key)))
            else:
                kept[key] = _untag(sub, (*path, key), problems)
        return Node(kept, node.pos, node.key_pos)
    if isinstance(node.value, list):
        items = []
        for i, sub in enumerate(node.value):
            if sub.tag == DELETE:
                problems.append(sub.pos.error((*path, i), f"{DELETE} applies to mapping keys, not list items"))
            else:
                items.append(_untag(sub, (*path, i), problems))
        return Node(items, node.pos, node.key_pos)
    return Node(node.value, node.pos, node.key_pos)


def _nothing_to_delete(node: Node, path: SpecPath) -> Diagnostic:
    return node.key_or_value_pos().error(path, f"{DELETE}: no inherited key '{path[-1]}' to delete")
