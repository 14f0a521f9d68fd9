"""Typed configs from YAML files with ``key=value`` overrides, checked before anything starts.

A config is a tree of dataclasses. :func:`load_config` reads a YAML file, applies dotted
overrides from the command line (``optimizer.lr=3e-4 parallel.ring=2``), and builds the tree
strictly: an unknown key, a value of the wrong type or a missing required field raises
:class:`ConfigError` naming the dotted field (with a suggestion for misspelt keys). Each
dataclass may validate itself in ``__post_init__``; those errors are re-raised with the field's
path in front.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the field."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is read as YAML (numbers, lists, null, ...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key of ``overrides`` in the nested dict ``tree`` (in place; returned)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return tree


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Build ``cls`` from a YAML file (or nothing) plus overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    apply_overrides(tree, list(overrides))
    return from_dict(cls, tree)


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Strictly build dataclass ``cls`` from a nested dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f"; did you mean {_join(where, close[0])!r}?" if close else ""
        raise ConfigError(
            f"unknown config key {_join(where, key)!r}{hint} "
            f"(known keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        path = _join(where, name)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {path!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The plain nested dict of a config tree (for saving next to checkpoints and logs)."""
    return dataclasses.asdict(config)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value
