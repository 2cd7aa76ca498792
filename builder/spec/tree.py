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
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

from moebuild.spec.errors import Diagnostic, SpecError, SpecPath

DELETE, REPLACE = "!delete", "!replace"
MAX_SPEC_BYTES = 1 << 20
"""Largest spec file read (the largest preset is about 3 KB)."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists (presets nest 5 levels)."""
MAX_VALUES = 20_000
"""Most values one file or override may hold once its aliases are expanded."""
_YAML_TAG = "tag:yaml.org,2002:"
_MAP, _SEQ, _MERGE, _INT = (_YAML_TAG + t for t in ("map", "seq", "merge", "int"))
_SCALARS = {_YAML_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp")}


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
    """Parse one YAML file into a Node tree; any problem raises a located SpecError."""
    text = _read_text(path, Pos(shown))
    at = Pos(shown, 1, 1)
    root = _YamlReader(shown).read(text, at)
    if root.value is None:
        raise SpecError([at.error((), "empty file; expected a mapping of spec keys")])
    if not isinstance(root.value, dict):
        raise SpecError([at.error((), f"expected a mapping of spec keys, got {_kind(root.value)}")])
    return root


def read_value(text: str, at: Pos) -> Node:
    """One YAML value written inline (an override's right-hand side) starting at ``at``."""
    return _YamlReader(at.file, shift=at).read(text, at)


def _read_text(path: Path, whole: Pos) -> str:
    """The file's text; only a regular UTF-8 file of at most MAX_SPEC_BYTES is read (never a pipe,
    a device or a directory, which could block or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SpecError([whole.error((), "no such file")]) from None
    except IsADirectoryError:
        raise SpecError([whole.error((), "is a directory, not a YAML spec file")]) from None
    except OSError as exc:
        raise SpecError([whole.error((), f"cannot read: {exc.strerror}")]) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SpecError([whole.error((), "is a directory, not a YAML spec file")])
        if not stat.S_ISREG(mode):
            raise SpecError([whole.error((), "is not a regular file (a pipe, device or socket); a spec is a YAML file")])
        data = os.read(fd, MAX_SPEC_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError([whole.error((), f"is larger than {MAX_SPEC_BYTES >> 20} MiB; a spec is a small YAML file")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError([whole.error((), "not a UTF-8 text file")]) from None


class _TooBig(Exception):
    pass


class _YamlReader:
    """YAML text -> Node tree, from ruamel's composed node graph (every node keeps its place).

    Reading the graph rather than constructed Python objects sees what a spec must not do: tags
    other than !delete / !replace (python tags never construct anything here), aliases that
    expand exponentially or contain themselves, nesting deeper than MAX_DEPTH. Merge keys
    (``<<: *anchor``) are ordinary YAML and are merged here: keys written in the mapping win,
    then earlier merged mappings over later ones.
    """

    def __init__(self, shown: str, shift: Pos | None = None):
        self.shown, self.shift = shown, shift
        self.problems: list[Diagnostic] = []
        self.values = 0
        self.yaml = YAML()

    def read(self, text: str, at: Pos) -> Node:
        deep = _deep_flow(text)
        if deep is not None:
            pos = self._pos(_Mark(*deep))
            raise SpecError([pos.error((), f"nested too deeply (a spec nests at most {MAX_DEPTH} levels)")])
        try:
            graph = self.yaml.compose(text)
        except RecursionError:
            raise SpecError([at.error((), f"nested too deeply (a spec nests at most {MAX_DEPTH} levels)")]) from None
        except MarkedYAMLError as exc:
            raise SpecError([self._yaml_error(exc)]) from None
        except YAMLError as exc:
            raise SpecError([at.error((), f"not valid YAML: {exc}")]) from None
        if graph is None:
            return Node(None, at)
        try:
            root = self._node(graph, (), None, frozenset())
        except _TooBig:
            raise SpecError([at.error((), f"expands to more than {MAX_VALUES:,} values "
                                          "(YAML aliases repeated inside each other?)")]) from None
        if self.problems:
            raise SpecError(self.problems)
        return root

    def _pos(self, mark) -> Pos:
        pos = Pos(self.shown, mark.line + 1, mark.column + 1)
        if self.shift is not None and pos.line == 1:
            pos = Pos(self.shown, self.shift.line, self.shift.col + pos.col - 1)
        return pos

    def _yaml_error(self, exc: MarkedYAMLError) -> Diagnostic:
        mark = exc.problem_mark or exc.context_mark
        text = exc.problem or exc.context or "cannot parse"
        if exc.problem and exc.context:
            where = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            text += f" ({exc.context}{where})"
        pos = self._pos(mark) if mark else Pos(self.shown, 1, 1)
        return pos.error((), f"not valid YAML: {text}")

    def _node(self, node, path: SpecPath, key_pos: Pos | None, inside: frozenset[int]) -> Node:
        pos = self._pos(node.start_mark)
        self.values += 1
        if self.values > MAX_VALUES:
            raise _TooBig
        if id(node) in inside:
            self.problems.append(pos.error(path, "an alias here refers to a node that contains it"))
            return Node(None, pos, key_pos)
        if len(path) > MAX_DEPTH:
            self.problems.append(pos.error(path, f"nested too deeply (a spec nests at most {MAX_DEPTH} levels)"))
            return Node(None, pos, key_pos)
        tag = _tag_name(node)
        if isinstance(node, MappingNode):
            self._check_tag(tag, _MAP, pos, path)
            children = self._mapping(node, path, inside | {id(node)})
            return Node(children, pos, key_pos, REPLACE if tag == REPLACE else None)
        if isinstance(node, SequenceNode):
            self._check_tag(tag, _SEQ, pos, path)
            items = [self._node(item, (*path, i), None, inside | {id(node)}) for i, item in enumerate(node.value)]
            return Node(items, pos, key_pos, REPLACE if tag == REPLACE else None)
        if tag == REPLACE:
            self.problems.append(pos.error(path, f"{REPLACE} applies to a mapping or a list"))
        if tag == DELETE:
            return Node(None, pos, key_pos, DELETE)
        if tag not in _SCALARS:
            self._check_tag(tag, (), pos, path)
            return Node(None, pos, key_pos)
        return Node(self._scalar(node, pos, path), pos, key_pos)

    def _check_tag(self, tag: str, plain: tuple[str, ...], pos: Pos, path: SpecPath) -> None:
        if tag in plain or tag == REPLACE:
            return
        shown = "!!" + tag[len(_YAML_TAG):] if tag.startswith(_YAML_TAG) else tag
        why = " (a spec is plain data: python tags never run code here)" if "python/" in tag else ""
        self.problems.append(pos.error(path, f"unknown tag '{shown}'; expected {DELETE} or {REPLACE}{why}"))

    def _scalar(self, node, pos: Pos, path: SpecPath) -> Any:
        too_big = "cannot read this value: integers in a spec fit in 64 bits"
        try:
            value = _scalar(self.yaml.constructor.construct_object(node, deep=True))
        except (ValueError, YAMLError) as exc:
            if _tag_name(node) == _INT:  # a decimal integer past Python's 4,300-digit limit for int(str)
                self.problems.append(pos.error(path, too_big))
            else:
                self.problems.append(pos.error(path, f"cannot read this value: {first_line(exc).split(';')[0]}"))
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 63:
            # hex, octal and binary escape Python's digit limit, and no spec number needs more
            self.problems.append(pos.error(path, too_big))
            return None
        return value

    def _mapping(self, node, path: SpecPath, inside: frozenset[int]) -> dict[Any, Node]:
        children: dict[Any, Node] = {}
        merged: list = []
        for key_node, value_node in node.value:
            key_pos = self._pos(key_node.start_mark)
            if _tag_name(key_node) == _MERGE:
                merged += value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                continue
            if not isinstance(key_node, ScalarNode):
                self.problems.append(key_pos.error(path, "a key must be a plain scalar, not a mapping or a list"))
                continue
            key = self._scalar(key_node, key_pos, path)
            if key in children:
                first = children[key].key_or_value_pos()
                self.problems.append(key_pos.error((*path, key), f"duplicate key '{key}' (first at line {first.line})"))
                continue
            children[key] = self._node(value_node, (*path, key), key_pos, inside)
        for source in merged:
            if not isinstance(source, MappingNode):
                self.problems.append(self._pos(source.start_mark).error(path, "a merge key (<<) takes a mapping or a list of mappings"))
                continue
            # through _node: a merged mapping counts against MAX_VALUES and may not contain itself
            for key, child in (self._node(source, path, None, inside).value or {}).items():
                children.setdefault(key, child)
        return children


@dataclass(frozen=True)
class _Mark:
    line: int  # 0-based, as ruamel's marks
    column: int


def _deep_flow(text: str) -> tuple[int, int] | None:
    """(line, column), 0-based, where flow collections ([...], {...}) open past MAX_DEPTH levels.

    Read without parsing: ruamel's composer recurses once per level and takes seconds to give up
    on a few thousand. Quoted strings and comments are skipped; what this misses still ends in
    the RecursionError that `read` reports."""
    depth, quote = 0, None
    for line_no, line in enumerate(text.splitlines()):
        for col, char in enumerate(line):
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "#" and (col == 0 or line[col - 1] in " \t"):
                break
            elif char in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    return line_no, col
            elif char in "]}":
                depth = max(depth - 1, 0)
    return None


def _tag_name(node) -> str:
    tag = getattr(node.tag, "value", node.tag)  # ruamel >= 0.18 wraps it in a Tag
    return tag if isinstance(tag, str) else ""


def _kind(value: Any) -> str:
    """What a value is, without its content (it may come from a file that is not a spec)."""
    if isinstance(value, (dict, list)) or value is None or isinstance(value, bool):
        return describe_value(value)
    return "a string" if isinstance(value, str) else "a number"


def first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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
        return repr(value) if len(value) <= 60 else repr(value[:60]) + "... (" + f"{len(value):,} characters)"
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
