"""The config and command-line layer every stage shares (`zoo.build`, `hyperrep.fit`, `probes.evaluate`, ...).

A stage's config is a frozen dataclass deriving from `Config`. Its fields are declared with `option(default,
...)`, whose bounds and choices are checked the same way for every stage, with the key named in the message:

    @dataclass(frozen=True)
    class FitConfig(Config):
        lr: float = option(1e-3, gt=0)
        precision: str = option("auto", choices=("auto", "32-true", "bf16-mixed"))

Configs load from YAML files and `key=value` overrides (defaults < file < overrides); unknown keys fail.
Bad input from the user raises `UsageError`, which `run_cli` prints as one line with exit code 2.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")
_MISSING = dataclasses.MISSING


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def require(obj: Any, checks: typing.Iterable[tuple[bool, str, str]], label: str = "{key}") -> None:
    """Raise one UsageError for the first failed (ok, key, what) check: "<label> must be <what>, got <value>"."""
    for ok, key, what in checks:
        if not ok:
            raise UsageError(f"{label.format(key=key)} must be {what}, got {getattr(obj, key)!r}")


def option(default: Any = _MISSING, *, choices: typing.Iterable | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, factory=None,
           each: bool = False) -> Any:
    """A config field with declared bounds or choices; `each` applies them to every item of a list."""
    meta = {"choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "each": each}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _bound_text(meta: dict) -> str:
    lo = f"[{meta['ge']}" if meta["ge"] is not None else (f"({meta['gt']}" if meta["gt"] is not None else "(-inf")
    hi = f"{meta['le']}]" if meta["le"] is not None else (f"{meta['lt']})" if meta["lt"] is not None else "inf)")
    return f"in {lo}, {hi}"


def _check_value(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise UsageError(f"config key '{key}' must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"config key '{key}' must be a finite number, got {value!r}")
        ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
        bad = (ge is not None and value < ge) or (gt is not None and value <= gt) \
            or (le is not None and value > le) or (lt is not None and value >= lt)
        if bad:
            raise UsageError(f"config key '{key}' must be {_bound_text(meta)}, got {value!r}")


def check_options(cfg: Any) -> None:
    """Check every `option` field of a dataclass instance against its declared bounds and choices."""
    for f in dataclasses.fields(cfg):
        meta = dict(f.metadata)
        if not meta:
            continue
        value = getattr(cfg, f.name)
        if meta.get("each") and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                _check_value(f"{f.name}[{i}]", v, meta)
        else:
            _check_value(f.name, value, meta)


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every stage config: options are checked on construction, then `check()` (cross-field rules)."""

    def __post_init__(self):
        check_options(self)
        self.check()

    def check(self) -> None:
        """Rules that involve several keys; raise UsageError naming them."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists become tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0])
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config key '{key}' must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}' must be a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
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
    unknown = sorted(set(map(str, data)) - set(names))
    if unknown:
        raise UsageError(f"unknown config key '{unknown[0]}' in {source}; valid keys: {', '.join(names)}")
    values = {k: coerce(v, hints[k], k) for k, v in data.items()}
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


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file through the safe loader only; a missing or malformed file is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None


def merged_dict(cls: type, path: str | Path | None, overrides: list[str], defaults: dict | None = None,
                values: dict | None = None) -> dict:
    """Defaults < YAML file < `key=value` overrides (dotted keys reach into mapping fields) < `values` (already
    parsed, e.g. from command-line flags)."""
    data: dict = dict(defaults or {})
    if path is not None:
        if not Path(path).is_file():
            raise UsageError(f"config file {path} does not exist; pass an existing YAML file to --config")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a YAML mapping of config keys")
        data.update(loaded)
    names = {f.name for f in dataclasses.fields(cls)}
    for item in overrides:
        keys, value = _parse_override(item)
        if keys[0] not in names:
            raise UsageError(f"unknown config key '{keys[0]}' in override '{item}'; "
                             f"valid keys: {', '.join(sorted(names))}")
        target = data
        for k in keys[:-1]:
            target[k] = dict(target.get(k) or {})
            target = target[k]
        target[keys[-1]] = value
    data.update(values or {})
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                defaults: dict | None = None, values: dict | None = None) -> C:
    """`cls` from defaults < the YAML file at `path` < `key=value` overrides < `values`."""
    source = str(path) if path is not None else "config"
    return from_dict(cls, merged_dict(cls, path, list(overrides), defaults, values), source)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict:
    """A config as plain YAML-safe values (tuples become lists)."""
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


def config_cli(cls: type[C], argv: list[str], prog: str, doc: str, flags: dict[str, str],
               defaults: dict | None = None, extra=None) -> tuple[C, Any]:
    """The command line every stage shares: `--config FILE`, one `--flag VALUE` per entry of `flags`
    (flag name -> config key; a key ending in '+' takes one or more values, a list), and `key=value`
    overrides; flags win over overrides, overrides over the file. `extra(parser)` may add flags that are not
    config keys. Returns (config, parsed args)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0],
                                 epilog="any config key can also be set as key=value (configs/ has examples)")
    ap.add_argument("--config", help="YAML config file")
    for flag, key in flags.items():
        name = key.rstrip("+")
        ap.add_argument(f"--{flag}", dest=f"flag_{name}", metavar=name.upper(),
                        nargs="+" if key.endswith("+") else None, help=f"config key {name}")
    if extra is not None:
        extra(ap)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_intermixed_args(argv)
    given = {key.rstrip("+"): getattr(args, f"flag_{key.rstrip('+')}") for key in flags.values()}
    given = {k: v for k, v in given.items() if v is not None}
    overrides = list(args.overrides)
    for k, v in given.items():  # `--zoo A.h5 B.h5 epochs=3`: a list flag swallows the key=value after it
        if isinstance(v, list):
            extra_overrides = [x for x in v if "=" in x and not Path(x).exists()]
            given[k] = [x for x in v if x not in extra_overrides]
            overrides += extra_overrides
    return load_config(cls, args.config, overrides, defaults, _typed(cls, given)), args


def _typed(cls, values: dict) -> dict:
    """Flag strings parsed as YAML scalars for non-string fields (`--n 5` -> 5), kept as text for strings."""
    def parse(v: str):
        try:
            return yaml.safe_load(v)
        except yaml.YAMLError:
            return v

    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in values.items():
        tp, args = hints[k], typing.get_args(hints[k])
        if isinstance(v, list):
            out[k] = v if args and args[0] is str else [parse(x) for x in v]
        else:
            out[k] = v if tp is str else parse(v)
    return out
