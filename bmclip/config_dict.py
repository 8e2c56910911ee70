"""Nested dicts onto config dataclasses: the one typed, checked update used by every config in bmclip.

``update_from_dict(obj, {"optim": {"lr": "1e-4"}, "data.batch_size": 256})`` sets fields in place, converting
each value to its annotated type (from YAML or a command-line string: ``"true"``, ``"1e-4"``, ``"[a, b]"``);
a dotted key reaches into a sub-dataclass, a mapping updates one key by key, and a value of the section's own
dataclass type replaces it. An unknown key is a ConfigError that names it and lists the valid keys there.
``parse_strings=False`` (programmatic values, e.g. a model config read back from a checkpoint) refuses a string
where the field is not a string instead of parsing it (``"yes"`` for a bool is then an error).
A null (YAML ``key:``, ``~`` or ``null``; Python None) is None for an optional field; for a plain ``str`` field
whose default is ``""`` (the "unset" value: no val shards, a temp cache folder, the bundled vocabulary) it is
``""``, and for any other ``str`` field a ConfigError naming the key (it never becomes the string ``"None"``).
The training config (``bmclip.train.config``), the model config (``ModelConfig.from_dict``) and
``create_model``'s overrides all go through it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Any

from bmclip.errors import ConfigError

__all__ = ["update_from_dict"]


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _field_default(cls: type, name: str) -> Any:
    """The dataclass field's default value (None when it has only a factory or none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return None if f.default is dataclasses.MISSING else f.default


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], key)
    if origin is list:
        (elem,) = typing.get_args(tp)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("[") and s.endswith("]"):
                s = s[1:-1]
            value = [v.strip() for v in s.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if math.isnan(f):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return f
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - programming error


def _set(obj: Any, dotted: str, value: Any, prefix: str = "", parse_strings: bool = True) -> None:
    head, _, rest = dotted.partition(".")
    full = f"{prefix}{head}"
    types_ = _field_types(type(obj))
    if head not in types_:
        raise ConfigError(f"unknown config key {full!r}; valid keys here: {sorted(types_)}")
    tp = types_[head]
    sub = getattr(obj, head)
    if dataclasses.is_dataclass(sub):
        if not rest and isinstance(value, type(sub)):  # a whole section given as its dataclass
            setattr(obj, head, copy.deepcopy(value))
        elif rest:
            _set(sub, rest, value, f"{full}.", parse_strings)
        elif isinstance(value, dict):
            update_from_dict(sub, value, f"{full}.", parse_strings=parse_strings)
        else:
            raise ConfigError(f"{full}: is a section; give a mapping or a sub-key like {full}.<key>")
        return
    if rest:
        raise ConfigError(f"unknown config key {prefix}{dotted!r}: {full!r} is not a section")
    if value is None and tp is str:
        default = _field_default(type(obj), head)
        if default != "":
            raise ConfigError(f"{full}: must not be null (an empty YAML value, ~ or null): give a string, or leave "
                              f"the key out to keep {getattr(obj, head)!r}")
        value = ""  # the field's "unset" value
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if not parse_strings and isinstance(value, str) and str not in (typing.get_args(tp) if union else (tp,)):
        raise ConfigError(f"{full}={value!r}: expected a {getattr(tp, '__name__', tp)}, not a string")
    setattr(obj, head, _convert(value, tp, full))


def update_from_dict(obj: Any, values: dict[str, Any], prefix: str = "", *, parse_strings: bool = True) -> Any:
    """Apply a nested dict of values onto a config dataclass in place (typed; unknown keys raise)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    for k, v in values.items():
        _set(obj, str(k), v, prefix, parse_strings)
    return obj
