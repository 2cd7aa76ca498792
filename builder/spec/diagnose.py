"""Pydantic validation errors -> located, plain-English Diagnostics.

Pydantic reports a ``loc`` into the *model*: discriminated unions add the tag
(``("vision", "clip", "image_size")``) and plain unions add one entry per member tried
(``"literal['all','every_other']"``, ``"FirstKDense"``, ``"list[int]"``). Walking ``loc``
alongside the data strips those, giving the data path, which the Node tree turns into a
file position. Of a plain union's per-member errors only those from the member that
fits the value's kind are kept; when none fits they become one "expected ... or ..." line.
"""

from __future__ import annotations

import re
import types
import typing
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from moebuild.spec.errors import Diagnostic, SpecPath, did_you_mean
from moebuild.spec.tree import Node, describe_value, node_at

_KINDS = {  # error types that mean "wrong kind of value", and the kind expected
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "tuple_type": "a list", "set_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "none_required": "null",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


@dataclass
class _Error:
    raw: dict[str, Any]
    path: SpecPath  # into the data, union tags removed
    union: SpecPath | None  # data path of the first plain/discriminated union along loc
    at_union: bool  # the error is about the union member itself, not inside it

    @property
    def type(self) -> str:
        return self.raw["type"]

    def wrong_kind(self) -> bool:
        literal_misfit = self.type == "literal_error" and not isinstance(self.raw["input"], str)
        return self.at_union and (self.type in _KINDS or literal_misfit)


def validation_diagnostics(exc: ValidationError, model: type[BaseModel], root: Node,
                           data: Any) -> list[Diagnostic]:
    """One Diagnostic per problem in ``exc`` (raised validating ``data``, read into ``root``)."""
    out: list[Diagnostic] = []
    unions: dict[SpecPath, list[_Error]] = defaultdict(list)
    for raw in exc.errors():
        problems = getattr((raw.get("ctx") or {}).get("error"), "problems", None)
        if raw["type"] == "value_error" and problems is not None:
            out += [_place(root, tuple(p), "value").error(tuple(p), m) for p, m in problems]
            continue
        err = _clean(raw, data)
        if err.union is None:
            out.append(_diagnose(err, model, root, data))
        else:
            unions[err.union].append(err)
    for path, errors in unions.items():
        fitting = [e for e in errors if not e.wrong_kind()]
        if fitting:
            out += [_diagnose(e, model, root, data) for e in fitting]
        else:
            kinds = list(dict.fromkeys(_expected_kind(e) for e in errors))
            expected = ", ".join(kinds[:-1]) + " or " + kinds[-1] if len(kinds) > 1 else kinds[0]
            got = describe_value(errors[0].raw["input"])
            out.append(_place(root, path, "value").error(path, f"expected {expected}, got {got}"))
    return out


def _clean(raw: dict[str, Any], data: Any) -> _Error:
    path: list[str | int] = []
    value, union, at_union = data, None, False
    loc = raw["loc"]
    for i, item in enumerate(loc):
        if isinstance(value, dict) and item in value:
            value = value[item]
        elif isinstance(value, list) and isinstance(item, int) and 0 <= item < len(value):
            value = value[item]
        elif i == len(loc) - 1 and raw["type"] == "missing":
            pass
        else:  # a union member's tag: not part of the data
            if union is None:
                union, at_union = tuple(path), i == len(loc) - 1
            continue
        path.append(item)
    return _Error(raw, tuple(path), union, at_union)


def _expected_kind(err: _Error) -> str:
    if err.type == "literal_error":
        return err.raw["ctx"]["expected"]
    return _KINDS[err.type]


def _diagnose(err: _Error, model: type[BaseModel], root: Node, data: Any) -> Diagnostic:
    raw, path = err.raw, err.path
    kind, ctx, got = raw["type"], raw.get("ctx") or {}, describe_value(raw["input"])
    if kind == "missing":
        return _place(root, path[:-1], "key").error(path[:-1], f"missing required key '{path[-1]}'")
    if kind == "extra_forbidden":
        fields = _field_names(_model_at(model, path[:-1], data))
        message = f"unknown key '{path[-1]}'{did_you_mean(path[-1], fields)}"
        return _place(root, path, "key").error(path[:-1], message)
    if kind == "union_tag_invalid":
        tags = re.findall(r"'([^']*)'", ctx["expected_tags"])
        message = f"unknown type '{ctx['tag']}'; expected one of: {', '.join(tags)}{did_you_mean(ctx['tag'], tags)}"
        return _place(root, (*path, "type"), "value").error((*path, "type"), message)
    if kind == "union_tag_not_found":
        tags = ", ".join(_union_tags(model, path, data))
        return _place(root, path, "key").error(path, f"missing required key 'type' (one of: {tags})")
    return _place(root, path, "value").error(path, _message(kind, ctx, raw, got))


def _message(kind: str, ctx: dict[str, Any], raw: dict[str, Any], got: str) -> str:
    if kind in _KINDS:
        return f"expected {_KINDS[kind]}, got {got}"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", ctx["expected"])
        hint = did_you_mean(raw["input"], options) if isinstance(raw["input"], str) else ""
        return f"expected {ctx['expected']}, got {got}{hint}"
    if kind in _BOUNDS:
        bound = next(v for k, v in ctx.items() if k in ("gt", "ge", "lt", "le"))
        return f"must be {_BOUNDS[kind]} {bound}, got {got}"
    if kind in ("too_short", "too_long"):
        which, limit = ("at least", ctx["min_length"]) if kind == "too_short" else ("at most", ctx["max_length"])
        return f"must have {which} {limit} item{'s' if limit != 1 else ''}, got {ctx['actual_length']}"
    if kind in ("value_error", "assertion_error"):
        return re.sub(r"^(Value error|Assertion failed), ", "", raw["msg"])
    message = raw["msg"]
    return message[:1].lower() + message[1:] + f", got {got}"


def _place(root: Node, path: SpecPath, what: str):
    """The position for an error at ``path``: its key (``what="key"``) or its value."""
    node, depth = node_at(root, path)
    if depth < len(path) or what == "value":
        return node.pos
    return node.key_or_value_pos()


def declares(model: type[BaseModel], path: SpecPath, data: Any) -> bool:
    """Whether ``model`` has a key at ``path`` (a field of the model class found at its parent)."""
    return bool(path) and path[-1] in _field_names(_model_at(model, path[:-1], data))


def _model_at(model: type[BaseModel], path: SpecPath, data: Any) -> type[BaseModel] | None:
    found = _narrow(_annotation_at(model, path, data), _value_at(data, path))
    return found if _is_model(found) else None


def _annotation_at(model: type[BaseModel], path: SpecPath, data: Any) -> Any:
    ann, value = model, data
    for key in path:
        ann = _narrow(ann, value)
        if _is_model(ann):
            field = next((f for n, f in ann.model_fields.items() if key in (n, f.alias)), None)
            ann = field.annotation if field else None
        elif typing.get_origin(ann) in (list, tuple):
            ann = typing.get_args(ann)[0]
        elif typing.get_origin(ann) is dict:
            ann = typing.get_args(ann)[1]
        else:
            return None
        value = _value_at(value, (key,))
    return ann


def _members(ann: Any) -> list[Any]:
    """The members of an annotation, Annotated and nested unions (an Optional discriminated union) flattened,
    None left out."""
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) not in (typing.Union, types.UnionType):
        return [ann]
    return [m for arg in typing.get_args(ann) if arg is not type(None) for m in _members(arg)]


def _narrow(ann: Any, value: Any) -> Any:
    """Annotated/Optional/union -> the one member ``value`` is meant for, or None."""
    members = _members(ann)
    if len(members) == 1:
        return members[0]
    models = [m for m in members if _is_model(m)]
    if isinstance(value, dict) and "type" in value:
        chosen = [m for m in models if value["type"] in _type_tags(m)]
        return chosen[0] if chosen else None
    if isinstance(value, dict) and len(models) == 1:
        return models[0]
    return None


def _union_tags(model: type[BaseModel], path: SpecPath, data: Any) -> list[str]:
    members = _members(_annotation_at(model, path, data))
    return [t for m in members if _is_model(m) for t in _type_tags(m)] if len(members) > 1 else []


def _type_tags(model: type[BaseModel]) -> tuple[Any, ...]:
    field = model.model_fields.get("type")
    return typing.get_args(field.annotation) if field else ()


def _field_names(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [name for n, f in model.model_fields.items() for name in {n, f.alias or n}]


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _value_at(data: Any, path: SpecPath) -> Any:
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data
