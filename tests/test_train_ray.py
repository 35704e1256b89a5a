"""Ray Train end to end on 2 CPU workers: resume, fault tolerance, export and load_sane."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from ray.train import TrainingFailedError

from sane_ray import storage
from sane_ray.model import SaneModel, tiny
from sane_ray.model.export import load_sane
from sane_ray.train import TrainConfig, train_sane
from sane_ray.train.checkpoint import TrainState, load_train_state
from sane_ray.train.config import OptimConfig
from sane_ray.train.optim import build_optimizer
from sane_ray.train.synthetic import synthetic_dataset

pytestmark = pytest.mark.timeout(180)

MODEL = dataclasses.replace(tiny(), window_size=8, d_model=32, d_z=8, projection_dim=8)
WORKERS = dict(num_workers=2, resources_per_worker={"CPU": 1})


def _cfg(**kw) -> TrainConfig:
    base = dict(model=MODEL, optim=OptimConfig(lr=1e-3), epochs=2, batch_size=8, num_threads=1, max_failures=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def datasets(ray_cluster):
    # 13 val windows: 6 per worker after the equal split, one partial batch each
    return {"train": synthetic_dataset(64, MODEL, seed=0), "val": synthetic_dataset(13, MODEL, seed=1)}


def _fail_once_at(epoch: int, marker: str):
    def hook(rank: int, done: int) -> None:
        if done == epoch and not os.path.exists(marker):
            import torch.distributed as dist  # inside: hooks are pickled by value, this module is not on the workers

            if dist.is_initialized():  # every rank's checkpoint upload is done before the fault
                dist.barrier()
            if rank == 1:
                open(marker, "w").close()
                raise RuntimeError("injected worker failure")
    return hook


def _stop_at(epoch: int):
    def hook(rank: int, done: int) -> None:
        if done == epoch:
            import torch.distributed as dist  # inside: hooks are pickled by value, this module is not on the workers

            if dist.is_initialized():  # every rank's checkpoint upload is done before the fault
                dist.barrier()
            raise RuntimeError("interrupted")
    return hook


def test_resume_with_same_run_name(datasets, tmp_path):
    cfg = _cfg()
    with pytest.raises(TrainingFailedError):
        train_sane(cfg, datasets, str(tmp_path), "resume", on_epoch_end=_stop_at(1),
                        controller_failure_limit=0, **WORKERS)
    result = train_sane(cfg, datasets, str(tmp_path), "resume", controller_failure_limit=0, **WORKERS)
    history = result.return_value
    assert [h["epoch"] for h in history] == [1.0, 2.0]
    assert result.metrics["epoch"] == 2.0 and result.metrics["resumed_from_epoch"] == 1.0
    assert history[0]["resumed_from_epoch"] == 0.0
    assert history[0]["steps"] == 4.0  # 32 windows per worker / batch 8
    for h in history:
        assert all(h[k] > 0 for k in ("train_loss", "val_loss", "tokens_per_s", "windows_per_s", "lr"))
        assert 0.0 <= h["data_wait_fraction"] < 1.0
    assert history[-1]["lr"] < history[0]["lr"]  # the one-cycle schedule continued across the resume

    # the exported model equals the last (sharded) checkpoint, loaded in one process
    run = storage.join(str(tmp_path), "resume")
    assert {"model.safetensors", "sane_config.json", "loss_curve.png", "summary.md"} <= set(storage.listdir(run))
    exported = load_sane(run)
    assert exported.cfg == MODEL and not exported.training
    torch.manual_seed(99)
    fresh = SaneModel(MODEL)
    opt, sched = build_optimizer(fresh, cfg.optim, total_steps=8)
    state = TrainState(fresh, opt, sched)
    with result.checkpoint.as_directory() as d:
        load_train_state(state, d)
    assert state.epoch == 2
    for name, t in exported.state_dict().items():
        assert torch.equal(t, fresh.state_dict()[name]), name


def test_worker_failure_restarts_from_last_checkpoint(datasets, tmp_path):
    marker = str(tmp_path / "failed-once")
    result = train_sane(
        _cfg(max_failures=1), {"train": datasets["train"]}, str(tmp_path), "faulty",
        on_epoch_end=_fail_once_at(1, marker), controller_failure_limit=0, **WORKERS,
    )
    assert os.path.exists(marker)
    assert result.error is None
    assert [h["epoch"] for h in result.return_value] == [1.0, 2.0]
    assert result.metrics["resumed_from_epoch"] == 1.0
    assert "val_loss" not in result.metrics
