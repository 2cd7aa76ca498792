"""Command-line overrides in Hydra's grammar (https://hydra.cc/docs/advanced/override_grammar/basic/).

``a.b=1`` changes an existing key, ``+a.b=1`` adds a new one, ``++a.b=1`` sets it either way,
``~a.b`` deletes it. Values are YAML flow (``moe.layers=[0,2]``, ``x=null``, ``p={a: 1}``);
list items are addressed as ``routes.0.top_k`` or ``routes[0].top_k``. A mapping value merges
into the existing mapping under the same rules as ``base:``. Every node an override writes is
positioned at ``<override 'a.b=1'>``, so a later error names the override.
A key the schema declares counts as existing even where the spec leaves it to its default,
so ``moe.dispatch.backend=torch`` works on a spec that never wrote ``dispatch``.
``base`` is refused: the base chain is merged before overrides apply, so changing it would do nothing.
No override may silently undo an earlier one: the same key twice (``a=1 a=2``), or a later override
above an earlier one that deletes, replaces or rewrites its key (``a.b=1 a={b: 2}``), is refused.
A later override below an earlier one refines it (``a={b: 1} a.c=2``) and is applied in order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from moebuild.spec.errors import (
    Diagnostic,
    SpecError,
    SpecPath,
    did_you_mean,
    format_path,
)
from moebuild.spec.tree import DELETE, MAX_DEPTH, REPLACE, Node, Pos, merge, read_value

_SEGMENT = re.compile(r"([A-Za-z_][\w-]*|\d+)((?:\[\d+\])*)")


@dataclass(frozen=True)
class Override:
    text: str
    op: str  # "=" change, "+" add, "++" set or add, "~" delete
    path: SpecPath
    value: Node | None

    @property
    def shown(self) -> str:
        if len(self.text) <= 80:
            return repr(self.text)
        return repr(self.text[:60]) + f"... ({len(self.text):,} characters)"

    def pos(self, col: int = 1) -> Pos:
        return Pos(f"<override {self.shown}>", 1, col)

    def error(self, message: str, path: SpecPath | None = None) -> Diagnostic:
        return self.pos().error(self.path if path is None else path, message)


Declared = Callable[[Node, SpecPath], bool]
"""Whether the schema has a key at this path of the tree (written or not)."""


def apply_overrides(root: Node, texts: tuple[str, ...] | list[str], problems: list[Diagnostic],
                    declared: Declared = lambda root, path: False) -> None:
    """Apply each override to ``root`` in place; a bad one becomes a diagnostic and is skipped."""
    applied: list[Override] = []
    for text in texts:
        try:
            override = parse_override(text)
        except _BadOverride as bad:
            problems.append(bad.diagnostic)
            continue
        if override.path[0] == "base":
            problems.append(_base_refused(override))
            continue
        undone = next(((earlier, path) for earlier in applied if (path := _undoes(override, earlier))), None)
        if undone is not None:
            problems.append(_undoes_error(override, *undone))
            continue
        applied.append(override)
        _apply(root, override, problems, lambda path: declared(root, path))


def _undoes(later: Override, earlier: Override) -> SpecPath | None:
    """What of ``earlier`` that ``later`` would silently undo: the same key, or a key ``earlier`` wrote
    below ``later``'s that ``later`` deletes, replaces, or merges a new value for. A later override
    below an earlier one refines it (``a={b: 1}`` then ``a.c=2``) and is fine."""
    if later.path == earlier.path:
        return earlier.path
    return next((path for path in _written(earlier.path, earlier.value) if _reaches(later, path)), None)


def _written(path: SpecPath, value: Node | None) -> list[SpecPath]:
    """The keys an override sets: a mapping value merges, so each of its leaves; anything else, the key itself."""
    if value is None or not isinstance(value.value, dict) or not value.value:
        return [path]
    return [leaf for key, child in value.value.items() for leaf in _written((*path, key), child)]


def _reaches(later: Override, path: SpecPath) -> bool:
    if path[: len(later.path)] != later.path:
        return False
    if later.op == "~":
        return True
    node = later.value
    for key in path[len(later.path):]:
        if node.tag == REPLACE or not isinstance(node.value, dict):
            return True  # lists, scalars and !replace replace the whole value under them
        node = node.value.get(key, node.value.get(str(key)))
        if node is None:
            return False
    return True


def _undoes_error(later: Override, earlier: Override, path: SpecPath) -> Diagnostic:
    if later.path == earlier.path:
        return later.error(f"the same key as the override {earlier.shown} before it; give each key once "
                           "(the last would silently win)")
    verb = "delete" if later.op == "~" else "overwrite"
    return later.error(f"would {verb} {format_path(path)}, which the override {earlier.shown} before it "
                       "sets; give the key once, or put the more specific override last")


class _BadOverride(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


def parse_override(text: str) -> Override:
    op = next(p for p in ("++", "+", "~", "") if text.startswith(p))
    key, eq, value_text = text[len(op):].partition("=")
    blank = Override(text, op or "=", (), None)
    path = _parse_key(key, blank)
    if op == "~":
        if eq:
            raise _BadOverride(blank.error("'~key' deletes a key and takes no value", path))
        return Override(text, op, path, None)
    if not eq:
        raise _BadOverride(blank.error(f"expected 'key=value', '+key=value', '++key=value' or '~key', got {text!r}"))
    value_pos = blank.pos(len(op) + len(key) + 2)
    try:
        value = read_value(value_text, value_pos) if value_text else Node("", value_pos)
    except SpecError as exc:
        first = exc.diagnostics[0]
        if first.message.startswith("not valid YAML"):
            raise _BadOverride(value_pos.error(path, f"value {value_text!r} is {first.message}")) from None
        raise _BadOverride(Diagnostic(first.file, first.line, first.col, (*path, *first.path), first.message)) from None
    if value.tag == DELETE:
        raise _BadOverride(blank.error(f"to delete a key write '~{key}'", path))
    return Override(text, op or "=", path, value)


def _parse_key(key: str, blank: Override) -> SpecPath:
    path: list[str | int] = []
    for segment in key.split("."):
        match = _SEGMENT.fullmatch(segment)
        if not match:
            message = f"malformed key {key!r}; write keys as a.b.c, list items as a.0.b or a[0].b"
            raise _BadOverride(blank.error(message))
        head, indices = match.groups()
        path.append(int(head) if head.isdigit() else head)
        path.extend(int(i) for i in re.findall(r"\d+", indices))
    if len(path) > MAX_DEPTH:
        raise _BadOverride(blank.error(f"a key nests at most {MAX_DEPTH} levels"))
    return tuple(path)


def _base_refused(ov: Override) -> Diagnostic:
    why = "the base chain is merged before overrides apply"
    name = ov.value.value if ov.value is not None and ov.path == ("base",) else None
    if isinstance(name, str) and name:
        return ov.error(f"cannot be set by an override ({why}); write a spec file with 'base: {name}' instead")
    return ov.error(f"cannot be changed by an override ({why}); edit the spec file's 'base:' line instead", ("base",))


def _apply(root: Node, ov: Override, problems: list[Diagnostic], declared: Callable[[SpecPath], bool]) -> None:
    def absent(path: SpecPath) -> bool:
        return ov.op == "~" or ov.op == "=" and not declared(path)

    parent = root
    for depth, key in enumerate(ov.path[:-1]):
        child = _child(parent, key)
        if child is None:
            if absent(ov.path[: depth + 1]) or not isinstance(parent.value, dict):
                problems.append(_missing(ov, parent, ov.path[: depth + 1]))
                return
            child = Node({}, ov.pos(), ov.pos())
            parent.value[_key(parent, key)] = child
        parent = child
    last = ov.path[-1]
    if not isinstance(parent.value, (dict, list)):
        problems.append(ov.error(f"'{format_path(ov.path[:-1])}' is a scalar, not a mapping or list"))
        return
    existing = _child(parent, last)
    if existing is None and absent(ov.path):
        problems.append(_missing(ov, parent, ov.path))
    elif existing is not None and ov.op == "+":
        problems.append(ov.error(f"key already exists; to change it write '{ov.text[1:]}' "
                                 f"(or '+{ov.text}' to set it either way)"))
    elif ov.op == "~":
        del parent.value[_key(parent, last)]
    else:
        _set(parent, last, existing, ov, problems)


def _set(parent: Node, key: str | int, existing: Node | None, ov: Override,
         problems: list[Diagnostic]) -> None:
    value = merge(existing, ov.value, ov.path, problems)
    value.key_pos = ov.pos()
    if isinstance(parent.value, dict):
        parent.value[_key(parent, key)] = value
    elif existing is not None:
        parent.value[key] = value
    elif key == len(parent.value):
        parent.value.append(value)
    else:
        size = len(parent.value)
        problems.append(ov.error(f"no item {key}: the list has {size} items (a new one goes at {size})"))


def _key(parent: Node, key: str | int) -> str | int:
    """In a mapping, ``a.0`` names the key '0' unless the mapping has an integer key 0."""
    return key if isinstance(parent.value, list) or key in parent.value else str(key)


def _child(parent: Node, key: str | int) -> Node | None:
    if isinstance(parent.value, dict):
        return parent.value.get(_key(parent, key))
    if isinstance(parent.value, list) and isinstance(key, int) and 0 <= key < len(parent.value):
        return parent.value[key]
    return None


def _missing(ov: Override, parent: Node, path: SpecPath) -> Diagnostic:
    if isinstance(parent.value, list):
        return ov.error(f"no item {path[-1]}: the list has {len(parent.value)} items", path)
    if not isinstance(parent.value, dict):
        return ov.error(f"'{format_path(path[:-1])}' is a scalar, not a mapping or list", path)
    hint = did_you_mean(path[-1], parent.value)
    add = f" (to add a key, write '+{ov.text}')" if ov.op == "=" else ""
    return ov.error(f"no such key{hint}{add}", path)
