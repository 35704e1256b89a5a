"""Train building blocks in one process: runtime choice, schedule, step, noise, checkpoint."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sane_ray.config import ConfigError, load_config
from sane_ray.model import SaneModel, tiny
from sane_ray.train.checkpoint import TrainState, load_train_state, save_train_state
from sane_ray.train.config import OptimConfig, TrainConfig
from sane_ray.train.optim import build_optimizer
from sane_ray.train.runtime import cpu_has_bf16, select_runtime
from sane_ray.train.step import compute_loss, optimizer_step, to_device

CPU = select_runtime(use_gpu=False)


def _batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.window_size, cfg.d_t, generator=g)
    return {
        "x_i": x, "x_j": x.flip(0),
        "mask": torch.ones(b, cfg.window_size, cfg.d_t, dtype=torch.bool),
        "pos": torch.randint(0, 30, (b, cfg.window_size, 3), generator=g),
    }


def test_select_runtime():
    assert (CPU.device_type, CPU.backend, CPU.reduce_dtype) == ("cpu", "gloo", torch.float32)
    assert CPU.param_dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    native = select_runtime(use_gpu=False, cpu_bf16=True)
    assert (native.param_dtype, native.reduce_dtype, native.mixed) == (torch.bfloat16, torch.float32, True)
    emulated = select_runtime(use_gpu=False, cpu_bf16=False)
    assert (emulated.param_dtype, emulated.mixed) == (torch.float32, False)
    assert select_runtime(use_gpu=False, mixed_precision=False, cpu_bf16=True).param_dtype == torch.float32
    gpu = select_runtime(use_gpu=True)
    assert (gpu.device_type, gpu.backend, gpu.param_dtype, gpu.reduce_dtype) == ("cuda", "nccl", torch.bfloat16, torch.float32)
    assert select_runtime(use_gpu=True, mixed_precision=False).param_dtype == torch.float32


def test_one_cycle_schedule():
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3), total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3) and 28 <= lrs.index(max(lrs)) <= 30
    assert lrs[-1] == pytest.approx(1e-3 / 25 / 1e4, rel=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="positive number of steps"):
        build_optimizer(model, OptimConfig(), total_steps=0)


def test_train_config_from_yaml(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("epochs: 3\nmodel:\n  d_model: 32\n  n_heads: 2\n  max_positions: [8, 8, 8]\noptim:\n  betas: [0.8, 0.9]\n")
    cfg = load_config(TrainConfig, f, ["batch_size=7"])
    assert (cfg.epochs, cfg.batch_size, cfg.model.d_model, cfg.model.max_positions) == (3, 7, 32, (8, 8, 8))
    assert cfg.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(TrainConfig, None, ["batch_size=0"])


def test_to_device_names_missing_keys():
    with pytest.raises(KeyError, match="mask"):
        to_device({"x_i": torch.zeros(1), "x_j": torch.zeros(1), "pos": torch.zeros(1)}, torch.device("cpu"))


def test_loss_uses_clean_targets_and_noise_changes_inputs():
    cfg = dataclasses.replace(tiny(), window_size=6)
    torch.manual_seed(0)
    model = SaneModel(cfg)
    batch = _batch(cfg)
    clean = compute_loss(model, batch, cfg, CPU)
    again = compute_loss(model, batch, cfg, CPU)
    noisy = compute_loss(model, batch, cfg, CPU, noise=torch.Generator().manual_seed(1))
    assert clean.total.item() == again.total.item() != noisy.total.item()
    model.zero_grad()
    out = model(torch.cat([batch["x_i"], batch["x_j"]]), torch.cat([batch["pos"]] * 2))
    expected = ((out.x_hat - torch.cat([batch["x_i"], batch["x_j"]])) ** 2).mean()
    assert clean.reconstruction.item() == pytest.approx(expected.item(), rel=1e-5)


def test_optimizer_step_clips_and_reports_norm():
    cfg = dataclasses.replace(tiny(), window_size=6)
    torch.manual_seed(0)
    model = SaneModel(cfg)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3, grad_clip=1e-3), total_steps=5)
    loss = compute_loss(model, _batch(cfg), cfg, CPU).total
    norm = optimizer_step(loss, model, opt, sched, grad_clip=1e-3)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() > 1e-3 and clipped.item() == pytest.approx(1e-3, rel=1e-3)
    assert sched.last_epoch == 1


def test_checkpoint_round_trip_single_process(tmp_path):
    cfg = dataclasses.replace(tiny(), window_size=6)
    torch.manual_seed(0)
    model = SaneModel(cfg)
    opt, sched = build_optimizer(model, OptimConfig(), total_steps=10)
    for _ in range(2):
        optimizer_step(compute_loss(model, _batch(cfg), cfg, CPU).total, model, opt, sched, 1.0)
    save_train_state(TrainState(model, opt, sched, epoch=2, history=[{"epoch": 1}, {"epoch": 2}]), str(tmp_path / "c"))
    torch.manual_seed(5)
    other = SaneModel(cfg)
    o_opt, o_sched = build_optimizer(other, OptimConfig(), total_steps=10)
    restored = TrainState(other, o_opt, o_sched)
    load_train_state(restored, str(tmp_path / "c"))
    assert restored.epoch == 2 and restored.history == [{"epoch": 1}, {"epoch": 2}]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert o_sched.last_epoch == 2 and o_opt.state_dict()["state"][0]["step"].item() == 2
    with pytest.raises(FileNotFoundError, match="missing .metadata"):
        load_train_state(restored, str(tmp_path))


def test_steps_per_epoch_and_argument_checks():
    from sane_ray.train import train_sane, steps_per_epoch

    assert steps_per_epoch(100, 2, 8) == 6  # 50 rows per worker, partial batch dropped
    with pytest.raises(ValueError, match="too few for 4 workers"):
        steps_per_epoch(30, 4, 8)
    with pytest.raises(ValueError, match="'train'"):
        train_sane(TrainConfig(), {"val": None}, "/tmp/x", "n")
    with pytest.raises(ValueError, match="'train'"):
        train_sane(TrainConfig(), {"train": None, "test": None}, "/tmp/x", "n")
    with pytest.raises(ValueError, match="num_workers"):
        train_sane(TrainConfig(), {"train": None}, "/tmp/x", "n", num_workers=0)
