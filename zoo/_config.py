"""Typed configs: frozen dataclasses loaded from YAML and `key=value` overrides; unknown keys fail.

Shared by every stage's CLI (`zoo.build`, `hyperrep.fit`, `probes.evaluate`).
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Returns the value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0])
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config key '{key}' must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}' must be a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise UsageError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise UsageError(f"config key '{key}' must be an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UsageError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[C], data: dict, source: str = "config") -> C:
    """Build `cls` from a mapping; every key must be a field of `cls`."""
    if not isinstance(data, dict):
        raise UsageError(f"{source} must be a YAML mapping of config keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UsageError(f"unknown config key '{unknown[0]}' in {source}; valid keys: {', '.join(names)}")
    values = {k: _coerce(v, hints[k], k) for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: {e}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UsageError(f"override '{item}' is not of the form key=value (e.g. epochs=5)")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def merged_dict(cls: type, path: str | Path | None, overrides: list[str], defaults: dict | None = None) -> dict:
    """Defaults < YAML file < `key=value` overrides (dotted keys reach into mapping fields)."""
    data: dict = dict(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a YAML mapping of config keys")
        data.update(loaded)
    names = {f.name for f in dataclasses.fields(cls)}
    for item in overrides:
        keys, value = _parse_override(item)
        if keys[0] not in names:
            raise UsageError(f"unknown config key '{keys[0]}' in override '{item}'; valid keys: {', '.join(sorted(names))}")
        target = data
        for k in keys[:-1]:
            target[k] = dict(target.get(k) or {})
            target = target[k]
        target[keys[-1]] = value
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = (), defaults: dict | None = None) -> C:
    source = str(path) if path is not None else "config"
    return from_dict(cls, merged_dict(cls, path, list(overrides), defaults), source)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict:
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run `main(argv)`; a UsageError becomes one line on stderr and exit code 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
