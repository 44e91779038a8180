"""Typed loading of JSON into nested dataclasses (the manifest): every key checked against the annotations, one-line
`CacheError`s naming the file and the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from cache_tools.format.errors import CacheError


class _Bad(Exception):
    pass


def _check(value: Any, tp: Any, key: str, where: str, optional: tuple[str, ...], choices: Any) -> Any:
    """`value` converted to the annotated type `tp` (nested dataclasses loaded); raises _Bad on a mismatch."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return load_dataclass(tp, value, where, key, optional=optional, choices=choices)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(value, option, key, where, optional, choices)
            except _Bad:
                continue
        raise _Bad(tp)
    if origin is list:
        if not isinstance(value, list):
            raise _Bad(tp)
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{key}[{i}]", where, optional, choices) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(tp)
        _, item = typing.get_args(tp)
        return {k: _check(v, item, f"{key}.{k}", where, optional, choices) for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise _Bad(tp)
        return None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise _Bad(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def load_dataclass(cls: type, data: Any, where: str, prefix: str = "", *, optional: tuple[str, ...] = (),
                   choices: dict[type, tuple[tuple[str, tuple[str, ...]], ...]] | None = None) -> Any:
    """Instance of dataclass `cls` from `data`, requiring every field except those named in `optional` (unknown keys
    are ignored: forward compatible within a version); `choices` = per class, (field, allowed values)."""
    if not isinstance(data, dict):
        raise CacheError(f"{where}: key {prefix or '(top level)'} must be an object, got {type(data).__name__}; "
                         "rebuild the cache with --overwrite")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data and f.name in optional:
            continue  # the field's default
        if f.name not in data:
            raise CacheError(f"{where}: key {key} missing; rebuild the cache with --overwrite")
        try:
            values[f.name] = _check(data[f.name], hints[f.name], key, where, optional, choices)
        except _Bad:
            raise CacheError(f"{where}: key {key} is {data[f.name]!r} ({type(data[f.name]).__name__}), expected "
                             f"{_type_name(hints[f.name])}; rebuild the cache with --overwrite") from None
    for name, allowed in (choices or {}).get(cls, ()):
        if name in values and values[name] not in allowed:  # an optional key left out keeps its default
            raise CacheError(f"{where}: key {prefix + '.' if prefix else ''}{name} is {values[name]!r}, expected one "
                             f"of {', '.join(allowed)}; upgrade cache_tools or rebuild the cache")
    return cls(**values)
