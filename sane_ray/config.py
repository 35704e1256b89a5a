"""Typed configs: dataclasses loaded from YAML or TOML, with ``key.sub=value`` overrides.

Every job's settings are a (nested) dataclass with defaults. :func:`load_config` reads
an optional file and then applies command-line overrides, checking every key and
coercing every value to the declared type, so a typo fails before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value is invalid (the message names it)."""


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Iterable[str] = (), base: T | None = None,
) -> T:
    """Build ``cls`` from ``base`` (or the defaults), then ``path`` (YAML/TOML), then ``overrides``.

    Overrides are ``dotted.key=value`` strings; values are parsed as YAML scalars or
    lists (``lr=3e-4``, ``model.n_layers=2``, ``tags=[a,b]``).
    """
    # Start from the full defaults so a key set inside a section keeps that section's other
    # values (a nested default may differ from its class's own defaults).
    data: dict[str, Any] = to_dict(base if base is not None else cls())
    if path:
        _deep_merge(data, read_config_file(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(cls, data)


def with_values(cfg: T, values: dict[str, Any]) -> T:
    """A copy of config ``cfg`` with ``{"dotted.key": value}`` set, checked like a loaded file."""
    data = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(data, key, list(value) if isinstance(value, tuple) else value)
    return from_dict(type(cfg), data)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a dict."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ConfigError(f"config file not found: {p}")
    with open(p, "rb") as f:
        raw = f.read()
    try:
        if p.endswith(".toml"):
            data = tomllib.loads(raw.decode())
        elif p.endswith((".yaml", ".yml")):
            data = yaml.safe_load(raw) or {}
        else:
            raise ConfigError(f"config file {p} must end in .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse config file {p}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a (nested) dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config for {prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain (JSON/YAML-serializable) dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_config(cfg: Any) -> str:
    """The config as YAML text, loadable again with :func:`load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every non-dataclass field of a (nested) config dataclass."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, str] | None = None) -> None:
    """Add ``--config FILE`` and one ``--dotted.key VALUE`` flag per config field.

    ``aliases`` maps short flags (``--zoo``) to dotted keys (``data.zoo``). Values are
    parsed like overrides (YAML scalars); :func:`overrides_from_args` collects them.
    """
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML config file; flags override it")
    group = parser.add_argument_group("config keys (override the file)")
    for alias, key in (aliases or {}).items():
        group.add_argument(f"--{alias}", dest=f"cfg:{key}", metavar="VALUE", help=f"same as --{key}")
    defaults = to_dict(cls())
    for key in leaf_keys(cls):
        default = defaults
        for part in key.split("."):
            default = default[part]
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar="VALUE", default=None, help=f"default: {default}")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides given as flags to a parser built by :func:`add_config_arguments`."""
    return [f"{k[4:]}={v}" for k, v in vars(args).items() if k.startswith("cfg:") and v is not None]


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        item_t = args[0] if args else Any
        items = [_coerce(item_t, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            out = tp(value)
        except ValueError as e:
            raise ConfigError(f"{name} must be a number, got {value!r}") from e
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value
