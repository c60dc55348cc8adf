"""Typed configuration from plain mappings: the machinery behind `edge.config`.

Each section is a frozen dataclass whose fields say their type, range and meaning
(`setting`); `build_section` checks a mapping against it, refusing unknown keys, and every
refusal is a `ConfigError` that names the key path, what it got and what it expected.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar


class ConfigError(ValueError):
    """A configuration value that cannot be used, with the key path that holds it."""

    def __init__(self, path: str, value: object, expected: str) -> None:
        self.path = path or "<root>"
        self.value = value
        self.expected = expected
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"config key '{self.path}': got {shown}, expected {expected}")

def setting(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
       doc: str = "", path_must_exist: bool = False, factory: Any = dataclasses.MISSING) -> Any:
    meta = {"min": lo, "max": hi, "doc": doc, "exists": path_must_exist}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)

T = TypeVar("T")

def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    if tp is Path:
        return "a file path"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))

def _number(tp: type[int] | type[float], value: object, path: str,
            meta: dict[str, Any]) -> int | float:
    # NaN slips past ranges: refused here.
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or (tp is int and not float(value).is_integer()) or math.isnan(value)):
        raise ConfigError(path, value, _describe(tp))
    number = tp(value)
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and number < lo) or (hi is not None and number > hi) or (
        number in (float("inf"), float("-inf"))
    ):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(path, value, f"{_describe(tp)} {bounds}")
    return number

def _convert(tp: Any, value: object, path: str, meta: dict[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, meta)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, value, _describe(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool):
            # YAML reads 5 as int; accept its string form for string literals.
            if str(value) in allowed and not isinstance(value, bool):
                return str(value)
            raise ConfigError(path, value, _describe(tp))
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(path, value, _describe(tp))
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{path}[{i}]", {}) for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build_section(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, value, "true or false")
        return value
    if tp in (int, float):
        return _number(tp, value, path, meta)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, value, "a non-empty string")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, value, "a file path")
        p = Path(value).expanduser()
        if meta.get("exists") and not p.exists():
            raise ConfigError(path, value, "an existing file (it does not exist)")
        return p
    raise ConfigError(path, value, _describe(tp))  # pragma: no cover - config schema bug

def build_section(cls: type[T], data: object, path: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, data, "a mapping")
    hints = typing.get_type_hints(cls)
    if not dataclasses.is_dataclass(cls):  # pragma: no cover - config schema bug
        raise TypeError(f"{cls!r} is not a config section")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{path}.{key}" if path else str(key), data[key],
                              f"no such key here; allowed keys: {allowed}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key_path, dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key_path, None, f"a value ({f.metadata.get('doc', 'required')})")
    return cls(**kwargs)

def config_to_mapping(cfg: object) -> Any:
    """The inverse of `config_from_mapping`, for `--print-config` and tests."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_mapping(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_mapping(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg
