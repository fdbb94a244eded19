"""Config is data: dataclasses loaded from YAML and validated once, at the edge.

`from_dict` builds a (possibly nested) dataclass from a plain mapping and fails
on the first key it does not know, naming the key, where it was, and the
closest valid name, so a typo in a hospital's YAML never silently falls back
to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value a user has to fix; the message names it."""


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp, where: str):
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value                 # already parsed (e.g. a ModelConfig from its preset)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`; unknown keys and wrong types are ConfigErrors."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), list(fields))}; "
                              f"valid keys: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj) -> dict:
    """Plain, YAML/JSON-friendly dict of a dataclass (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(obj)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return dict(data)


def split_override(pair: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (KEY, VALUE read as YAML: `3`, `0.5`, `null`, `[linear]`, `{mri: zscore}`;
    an empty VALUE is null). ConfigError for a pair without '=' or with an empty key."""
    key, sep, text = str(pair).partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{pair!r}: expected KEY=VALUE, with a dotted KEY for a nested setting "
                          "(e.g. finetune.rounds=3)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: the value {text!r} is not valid YAML: {exc}") from None
    if isinstance(value, str) and value == text.strip() and _EXPONENT_FLOAT.fullmatch(value):
        value = float(value)        # YAML 1.1 (PyYAML) reads 1e-4 as a string: on a command line it means the number
    return key, value


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(data: Mapping[str, Any], pairs: Sequence[str | tuple[str, Any]],
                    short_forms: Mapping[str, Callable[[Any], dict]] | None = None) -> dict:
    """A copy of the config mapping `data` with each of `pairs` set in it, in order, before the
    mapping is parsed: a `KEY=VALUE` string (a command line's --set, its VALUE read as YAML) or a
    (KEY, value) pair already typed (`flwr run --run-config` keys). The values are then checked
    exactly like the YAML's (an unknown key is the same error, naming it). A dotted key reaches
    into a section (`finetune.rounds=3`), making it when it is absent. `short_forms` opens up a
    top-level section written in a short form (the model's preset name) into its mapping before a
    dotted key reaches into it."""
    out = _copy(data)
    for pair in pairs:
        key, value = split_override(pair) if isinstance(pair, str) else pair
        *sections, last = key.split(".")
        node, where = out, []
        for part in sections:
            where.append(part)
            child = node.get(part)
            if not isinstance(child, Mapping) and len(where) == 1 and part in (short_forms or {}):
                child = short_forms[part](child)
            if child is None:
                child = {}
            if not isinstance(child, Mapping):
                raise ConfigError(f"{key}: {'.'.join(where)} is {child!r}, a value, not a section with keys")
            node[part] = child = dict(child)
            node = child
        node[last] = value
    return out


def _copy(value):
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
