"""Typed configs: files, overrides, flags and clear errors."""

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from sane_ray.config import (
    ConfigError, add_config_arguments, dump_config, load_config, overrides_from_args,
)


@dataclass
class Inner:
    lr: float = 1e-3
    layers: int = 2
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "run"
    seed: Optional[int] = None
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, f, ["inner.layers=4", "tags=[p, q]", "seed=3", "flag=true"])
    assert cfg == Outer(name="x", seed=3, tags=["p", "q"], inner=Inner(lr=0.5, layers=4), flag=True)
    t = tmp_path / "c.toml"
    t.write_text('name = "y"\n[inner]\nmode = "b"\n')
    assert load_config(Outer, t).inner.mode == "b"


def test_round_trip_through_yaml(tmp_path):
    cfg = Outer(name="z", inner=Inner(lr=2.0))
    f = tmp_path / "dump.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(Outer, f) == cfg


def test_base_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  layers: 7\n")
    cfg = load_config(Outer, f, ["name=o"], base=Outer(name="b", inner=Inner(lr=9.0)))
    assert (cfg.name, cfg.inner.lr, cfg.inner.layers) == ("o", 9.0, 7)


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.lrr=1", "unknown config key 'inner.lrr'"),
        ("nmae=1", "unknown config key 'nmae'"),
        ("inner.layers=2.5", "inner.layers must be an integer"),
        ("inner.layers=abc", "inner.layers must be a number"),
        ("inner.mode=c", "inner.mode must be one of"),
        ("flag=maybe", "flag must be true or false"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="must end in"):
        load_config(Outer, bad)
    broken = tmp_path / "b.yaml"
    broken.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(Outer, broken)


def test_flags_override_every_key():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer, aliases={"lr": "inner.lr"})
    args = parser.parse_args(["--lr", "0.1", "--inner.layers", "5", "--name", "n"])
    cfg = load_config(Outer, args.config, overrides_from_args(args))
    assert (cfg.inner.lr, cfg.inner.layers, cfg.name) == (0.1, 5, "n")
