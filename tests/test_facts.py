"""Facts with one owner (issue 24): old runs stay readable, every reader asks the owner, unknown names are refused."""

from __future__ import annotations

import json

import pytest
import torch

from sane_ray.config import load_config
from sane_ray.data.format import CanonicalZoo
from sane_ray.embed.preprocess import PREPROCESSING_FILE, Preprocessing, checkpoints_at
from sane_ray.model.export import CONFIG_FILE
from sane_ray.model.layers import PositionOutOfRangeError, check_tables
from sane_ray.probe.config import ProbeConfig
from sane_ray.sample.config import SampleConfig
from sane_ray.train.tracking import TrackingConfig, check_tracking, open_tracker
from sane_ray.zoo.plan import ZooGenConfig
from sane_ray.zoo.spec import CheckpointRecord, ModelRecord


def _prep() -> Preprocessing:
    return Preprocessing(token_size=32, include_bn=False, pad_position=(50, 5, 20), align=False,
                         align_max_sweeps=1, align_seed=0, layouts={}, references={})


def test_the_training_window_is_not_in_preprocessing_and_old_runs_still_read():
    files = _prep().files()
    doc = json.loads(files[PREPROCESSING_FILE])
    assert "window_size" not in doc  # sane_config.json owns it
    old = {**doc, "version": 1, "window_size": 16, "token_size": 32}  # a run written before: both files held these
    prep = Preprocessing.from_files({PREPROCESSING_FILE: json.dumps(old).encode()}, "run")
    assert prep.pad_position == (50, 5, 20) and prep.token_size == 32
    with pytest.raises(ValueError, match="version 3"):
        Preprocessing.from_files({PREPROCESSING_FILE: json.dumps({**doc, "version": 4}).encode()}, "run")


def test_the_token_size_is_the_models():
    doc = json.loads(_prep().files()[PREPROCESSING_FILE])
    assert "token_size" not in doc  # sane_config.json owns it (d_t)
    files = {PREPROCESSING_FILE: json.dumps(doc).encode(), CONFIG_FILE: json.dumps({"d_t": 48}).encode()}
    assert Preprocessing.from_files(files, "run").token_size == 48
    with pytest.raises(ValueError, match=r"run/sane_config.json: missing \(the run's token size, d_t\)"):
        Preprocessing.from_files({PREPROCESSING_FILE: json.dumps(doc).encode()}, "run")


def test_epochs_default_to_the_runs_recorded_filter():
    canonical = CanonicalZoo(uri="", key="", zoo_uri="", settings={"epochs": [0, 2, 3], "skip_epoch_zero": True},
                             splits={}, files={}, checkpoints={}, groups={})
    model = ModelRecord("m", "mlp_digits", checkpoints=[CheckpointRecord("m", e, f"m/{e}") for e in range(4)])
    assert [c.epoch for c in checkpoints_at(canonical, model)] == [2, 3]
    assert [c.epoch for c in checkpoints_at(canonical, model, [0, 1])] == [0, 1]  # explicit epochs as given
    assert [c.epoch for c in checkpoints_at(None, model)] == [0, 1, 2, 3]  # no record: every epoch


def test_one_position_check_names_the_setting_and_the_coordinate():
    check_tables([10, 5, 20], (10, 5, 20), "train.model.max_positions", "this zoo")  # exactly enough
    with pytest.raises(PositionOutOfRangeError, match=r"train.model.max_positions=\[10, 5, 20\] is too small "
                       r"for this zoo: .*\[10, 6, 20\].*l \(layer index\) needs 6"):
        check_tables([10, 6, 20], (10, 5, 20), "train.model.max_positions", "this zoo")


def test_no_halo_is_zero_and_the_default_is_none_everywhere():
    assert ProbeConfig().halo is None and SampleConfig(run="r").halo is None
    assert load_config(SampleConfig, None, ["run=r", "halo=0"]).halo == 0
    for make in (lambda: ProbeConfig(halo=-1), lambda: SampleConfig(run="r", halo=-1)):
        with pytest.raises(ValueError, match="halo"):
            make()


def test_tracking_refuses_unknown_backends_naming_the_valid_ones():
    valid = "valid: none, mlflow, wandb"
    with pytest.raises(ValueError, match=valid):
        TrackingConfig(backend="neptune")
    with pytest.raises(ValueError, match=valid):
        load_config(TrackingConfig, None, ["backend=neptune"])
    with pytest.raises(ValueError, match=valid):
        open_tracker({"config": {"backend": "neptune"}, "run_name": "r", "run_uri": "u", "params": {}})
    check_tracking(TrackingConfig())
    assert open_tracker({"config": {"backend": "none"}, "run_name": "r", "run_uri": "u", "params": {}}) is None


def test_zoo_placement_is_not_part_of_the_zoo_identity():
    assert ZooGenConfig(node_types=True).identity() == ZooGenConfig().identity()  # cached zoos stay reused


def test_runtime_position_check_uses_the_same_rule():
    from sane_ray.model.layers import check_positions

    check_positions(torch.tensor([[9, 4, 19]]), (10, 5, 20))
    with pytest.raises(PositionOutOfRangeError, match=r"k \(row index\) needs 21.*SaneConfig|SaneConfig.*k \(row"):
        check_positions(torch.tensor([[9, 4, 20]]), (10, 5, 20))
