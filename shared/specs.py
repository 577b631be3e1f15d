"""Frozen dataclass configs to JSON and back: how a parent hands a child process its whole job, without pickle.

Rebuilding follows each field's type hint (nested dataclasses, `X | None`, tuples, paths, plain JSON values),
checking types on the way, so a spec file that was edited or truncated fails with a message, not later.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class SpecError(ValueError):
    """JSON that does not fit the spec's fields."""


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def dumps(spec: Any) -> str:
    return json.dumps(to_jsonable(spec), sort_keys=True)


def loads(cls: type[T], text: str) -> T:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"not JSON: {err}") from None
    return from_jsonable(cls, raw)


def from_jsonable(cls: type[T], raw: Any, where: str = "spec") -> T:
    return _build(cls, raw, where)


def _build(hint: Any, raw: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _build_union(hint, raw, where)
    if origin is typing.Literal:
        if raw not in typing.get_args(hint):
            raise SpecError(f"{where}: {raw!r} is not one of {typing.get_args(hint)}")
        return raw
    if origin is tuple:
        return _build_tuple(hint, raw, where)
    if origin is dict or hint is dict:
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: expected an object")
        args = typing.get_args(hint)
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in raw.items()} if args else dict(raw)
    if hint is Any:
        return raw
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, raw, where)
    return _build_scalar(hint, raw, where)


def _build_union(hint: Any, raw: Any, where: str) -> Any:
    options = typing.get_args(hint)
    if raw is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _build(option, raw, where)
        except SpecError as err:
            errors.append(str(err))
    raise SpecError(errors[0] if len(errors) == 1 else f"{where}: fits none of {hint}")


def _build_tuple(hint: Any, raw: Any, where: str) -> tuple:
    if not isinstance(raw, list):
        raise SpecError(f"{where}: expected a list")
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
        return tuple(_build(args[0], value, f"{where}[{n}]") for n, value in enumerate(raw))
    if len(raw) != len(args):
        raise SpecError(f"{where}: expected {len(args)} items")
    return tuple(_build(arg, value, f"{where}[{n}]") for n, (arg, value) in enumerate(zip(args, raw)))


def _build_dataclass(hint: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected an object")
    hints = typing.get_type_hints(hint)
    fields = {f.name: f for f in dataclasses.fields(hint) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SpecError(f"{where}: unknown field {unknown[0]!r}")
    values = {}
    for name, spec_field in fields.items():
        if name in raw:
            values[name] = _build(hints[name], raw[name], f"{where}.{name}")
        elif spec_field.default is dataclasses.MISSING and spec_field.default_factory is dataclasses.MISSING:
            raise SpecError(f"{where}: missing field {name!r}")
    try:
        return hint(**values)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: {err}") from None


def _build_scalar(hint: Any, raw: Any, where: str) -> Any:
    if hint is Path:
        if not isinstance(raw, str):
            raise SpecError(f"{where}: expected a path string")
        return Path(raw)
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise SpecError(f"{where}: expected a number")
        return float(raw)
    if hint in (int, str, bool):
        if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
            raise SpecError(f"{where}: expected {hint.__name__}, got {type(raw).__name__}")
        return raw
    raise SpecError(f"{where}: cannot rebuild a {hint!r}")
