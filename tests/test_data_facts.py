"""Token size, window and position tables have one owner, the data (issue 7, part 4).

A conflicting model copy is refused in one line before Ray starts; position tables may be
larger than the zoo needs, never smaller.
"""

from __future__ import annotations

import dataclasses

import pytest

from sane_ray.cli import main
from sane_ray.model import SaneModel, tiny
from sane_ray.pretrain_config import PretrainConfig, check_data_facts, model_for_data, preset_config


@pytest.fixture()
def no_ray(monkeypatch):
    """Starting Ray fails the test: a conflicting setting must be refused before."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a conflicting config reached Ray start-up")

    monkeypatch.setattr("sane_ray.pretrain.ensure_ray_for", forbidden)


@pytest.mark.parametrize("argv, expect", [
    (["--train.model.d_t", "99"], "train.model.d_t=99 conflicts with data.token_size=64"),
    (["--train.model.window_size", "5"], "train.model.window_size=5 conflicts with data.window_size=16"),
    (["--token-size", "32", "--train.model.d_t", "64"], "train.model.d_t=64 conflicts with data.token_size=32"),
])
def test_conflicting_model_copy_is_refused_in_one_line(no_ray, capsys, argv, expect):
    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sane-ray: error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert "Traceback" not in err


def test_the_data_sets_token_size_and_window():
    cfg = PretrainConfig()
    assert (cfg.train.model.d_t, cfg.train.model.window_size) == (0, 0)  # not a second copy
    check_data_facts(cfg)
    agreeing = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, model=dataclasses.replace(cfg.train.model, d_t=cfg.data.token_size)))
    check_data_facts(agreeing)  # an equal value is no conflict
    resnet = preset_config("resnet")
    assert (resnet.data.token_size, resnet.data.window_size, resnet.train.model.d_t) == (288, 256, 0)
    model = model_for_data(cfg.train.model, 48, 12, (30, 5, 9))
    assert (model.d_t, model.window_size) == (48, 12)
    SaneModel(model)
    with pytest.raises(ValueError, match="SaneConfig.d_t is 0"):
        SaneModel(cfg.train.model)


def test_position_tables_may_be_larger_never_smaller():
    model = dataclasses.replace(tiny(), max_positions=(100, 10, 20))
    assert model_for_data(model, 32, 16, (98, 8, 18)).max_positions == (100, 10, 20)  # headroom kept, not grown
    assert model_for_data(model, 32, 16, (50, 2, 3)).max_positions == (100, 10, 20)
    with pytest.raises(ValueError, match=r"train.model.max_positions=\[100, 10, 20\] is too small.*\[100, 11, 20\]"):
        model_for_data(model, 32, 16, (99, 10, 19))
