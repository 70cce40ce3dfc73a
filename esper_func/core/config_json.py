"""Configs to and from plain JSON: `from_dict` builds nested config dataclasses strictly
(unknown keys and wrong types are errors that name the field; a union of configs is picked
by its `kind` tag), `to_dict` writes them back (tuples become lists)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union

from esper_func.core.config import ConfigError, require

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    where = path or cls.__name__
    require(isinstance(data, dict), f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    require(not unknown, f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        dataclass_options = [o for o in options if dataclasses.is_dataclass(o)]
        if dataclass_options and isinstance(value, dict):
            return _convert_tagged(dataclass_options, value, where)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} matches none of {hint}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin is Literal:
        allowed = typing.get_args(hint)
        require(value in allowed, f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is tuple:
        require(isinstance(value, (list, tuple)), f"{where}: expected a list, got {value!r}")
        (item_type, _ellipsis) = typing.get_args(hint)
        return tuple(_convert(item_type, item, f"{where}[{i}]") for i, item in enumerate(value))
    if hint is float:
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{where}: expected a number, got {value!r}",
        )
        return float(value)
    if hint in (int, bool, str):
        require(
            type(value) is hint, f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}"
        )
        return value
    raise ConfigError(f"{where}: unsupported field type {hint}")


def _convert_tagged(options: list[type], value: dict[str, Any], where: str) -> Any:
    """Pick the dataclass in a union by its `kind` tag."""
    kinds = {o.__dataclass_fields__["kind"].default: o for o in options}  # type: ignore[attr-defined]
    kind = value.get("kind")
    require(kind in kinds, f"{where}.kind: {kind!r} is not one of {sorted(kinds)}")
    return from_dict(kinds[kind], value, where)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-JSON form of a config dataclass (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
