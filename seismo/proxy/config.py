"""Typed, safe config overrides: ``--set optim.lr=3e-3 --set model.qk_norm=true``.

Values are parsed by the type of the dataclass field they set (``ast.literal_eval`` for
literals, never ``eval``); unknown keys and values of the wrong type raise :class:`ConfigError`
with the field's dotted name. Numbers must be finite (``nan`` and ``inf`` are refused: no field
means anything by them) and integers must fit in 64 bits (``steps=1e30`` is refused, not turned
into a 31-digit integer); lists of integers hold integers (``[1.5]`` is refused, not truncated).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import typing
from typing import Any

from seismo.errors import ConfigError

__all__ = ["apply_overrides", "set_field", "check_value", "to_dict", "from_dict", "ConfigError", "INT_MAX"]

_TRUE = {"true", "yes", "on", "1"}
INT_MAX = 2**63 - 1  # what torch and numpy can hold: a larger count is a typo, not a run
_FALSE = {"false", "no", "off", "0"}


def _field_type(obj: Any, name: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    return hints.get(name)


def _parse(text: str, typ: Any, path: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.strip().lower() in ("none", "null") and len(args) < len(typing.get_args(typ)):
            return None
        typ = args[0] if len(args) == 1 else str
    if typ is bool:
        t = text.strip().lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        raise ConfigError(f"{path}: expected true or false, got {text!r}")
    if typ is int:
        try:
            v = ast.literal_eval(text.strip().replace("_", ""))
        except (ValueError, SyntaxError):
            raise ConfigError(f"{path}: expected an integer, got {text!r}") from None
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = _check_int(int(v), path, text)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{path}: expected an integer, got {text!r}")
        return _check_int(v, path, text)
    if typ is float:
        try:
            v = float(text.strip())
        except ValueError:
            raise ConfigError(f"{path}: expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"{path}: expected a finite number, got {text!r}")
        return v
    if typ is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(f"{path}: could not parse {text!r}") from None
    return check_value(value, typ, path)


def _check_int(v: int, path: str, text: object) -> int:
    if abs(v) > INT_MAX:
        raise ConfigError(f"{path}: {text!r} is out of range (at most {INT_MAX})")
    return v


def check_value(value: Any, typ: Any, path: str) -> Any:
    """``value`` if it fits the declared type ``typ`` (``int``, ``float``, ``list[int]``,
    ``list[float]``, ``list[str]``, ``dict[str, list[str]]``), else :class:`ConfigError` naming
    ``path``. Integers are not truncated (``1.5`` for an ``int`` is refused), numbers must be finite.
    Types it does not know pass unchecked."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= INT_MAX:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return _check_int(value, path, value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value) if not isinstance(value, int) else value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple) and args:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [check_value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and len(args) == 2:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table of {args[0].__name__} -> values, got {value!r}")
        return {check_value(k, args[0], path): check_value(v, args[1], f"{path}.{k}") for k, v in value.items()}
    return value


def set_field(cfg: Any, dotted: str, value_text: str) -> None:
    """Set ``cfg.a.b = parse(value_text)`` by the field's declared type."""
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:i])}: is not a section; cannot set {dotted!r}")
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(f"{dotted}: unknown key {part!r} in {where}; known keys: {', '.join(names)}")
        if i == len(parts) - 1:
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current):
                raise ConfigError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(current)[0].name}")
            setattr(obj, part, _parse(value_text, _field_type(obj, part), dotted))
        else:
            obj = getattr(obj, part)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``key=value`` strings in order; returns ``cfg`` (modified in place)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-3")
        key, value = item.split("=", 1)
        set_field(cfg, key.strip(), value.strip())
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a (nested) config dataclass from :func:`to_dict` output; unknown keys raise."""
    kwargs = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"{cls.__name__}: unknown key {k!r}")
        t = hints[k]
        kwargs[k] = from_dict(t, v) if dataclasses.is_dataclass(t) and isinstance(v, dict) else v
    return cls(**kwargs)
