"""Typed configs: dataclasses loaded from YAML or TOML, with ``key.sub=value`` overrides.

Every job's settings are a (nested) dataclass with defaults. :func:`load_config` reads
an optional file and then applies command-line overrides, checking every key and
coercing every value to the declared type, so a typo fails before any work starts.

Each field is described by a string literal right after it (an attribute docstring, as
Sphinx and jsonargparse read them); :func:`config_keys` gathers them for ``--help`` and
for ``docs/config.md`` (``tools/config_doc.py``), so a key's meaning is written once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import json
import os
import textwrap
import tomllib
import types
import typing
from typing import Any, Iterable, Iterator, TypeVar

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
    return [key for key, _, _, _ in _leaves(cls, prefix)]


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, type, str, Any]]:
    """``(dotted key, owning dataclass, field name, type)`` of every leaf field, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, cls, f.name, hints[f.name]


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One leaf of a config tree as a user sees it: in ``--help`` and in ``docs/config.md``."""

    key: str
    """Dotted name, the ``--key`` flag and the override's ``key=``."""
    type: str
    """The declared type, as written in the dataclass."""
    default: str
    """The default of this job (a nested section's may differ from its class's), as JSON."""
    help: str
    """The field's docstring on one line; "" where it has none."""
    aliases: tuple[str, ...]
    """Short flags for the same key (without the ``--``)."""


def config_keys(cls: type, aliases: dict[str, str] | None = None) -> list[ConfigKey]:
    """Every leaf key of config ``cls``: its type, default, description and short flags."""
    defaults = to_dict(cls())
    out = []
    for key, owner, name, tp in _leaves(cls):
        default: Any = defaults
        for part in key.split("."):
            default = default[part]
        out.append(ConfigKey(
            key=key,
            type=tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", ""),
            default=json.dumps(default),
            help=field_docs(owner).get(name, ""),
            aliases=tuple(a for a, k in (aliases or {}).items() if k == key),
        ))
    unknown = sorted(set(aliases or {}) - {a for k in out for a in k.aliases})
    if unknown:
        raise ValueError(f"alias --{unknown[0]} names no key of {cls.__name__}")
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after the field in ``cls``'s body, on one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in itertools.pairwise(body)
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
        and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
    }


class _HelpFormatter(argparse.HelpFormatter):
    """Names an option's value once after all its spellings (``--epochs, --train.epochs VALUE``)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {value}"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, str] | None = None) -> None:
    """Add ``--config FILE`` and one ``--dotted.key VALUE`` flag per config field, described in ``--help``.

    ``aliases`` maps short flags (``--zoo``) to dotted keys (``data.zoo_uri``); each is listed
    beside its key. Values are parsed like overrides (YAML scalars); :func:`overrides_from_args`
    collects them.
    """
    parser.formatter_class = _HelpFormatter
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML config file; flags override it")
    group = parser.add_argument_group("config keys (override the file; values are YAML: 3e-4, true, [a, b])")
    for k in config_keys(cls, aliases):
        text = f"{k.help} (default: {k.default})" if k.help else f"default: {k.default}"
        group.add_argument(*(f"--{a}" for a in (*k.aliases, k.key)), dest=f"cfg:{k.key}", metavar="VALUE",
                           default=None, help=text.replace("%", "%%"))


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
