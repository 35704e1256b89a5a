"""FSDP2 on 2 gloo processes (no Ray): gradient averaging, gathered NT-Xent, DCP, full state dict."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sane_ray.model import SaneModel, tiny
from sane_ray.train.checkpoint import TrainState, load_train_state, save_train_state
from sane_ray.train.config import OptimConfig
from sane_ray.train.distributed import gather_rows
from sane_ray.train.fsdp import apply_fsdp, data_parallel_mesh
from sane_ray.train.optim import build_optimizer
from sane_ray.train.runtime import select_runtime
from sane_ray.train.step import compute_loss

WORLD = 2
LOCAL_B = 3
CFG = dataclasses.replace(tiny(), window_size=8)


def _batch(b: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x_i = torch.randn(b, CFG.window_size, CFG.d_t, generator=g)
    mask = (torch.rand(b // WORLD, CFG.window_size, CFG.d_t, generator=g) > 0.2).repeat(WORLD, 1, 1)
    return {
        "x_i": x_i,
        "x_j": x_i + 0.1 * torch.randn(x_i.shape, generator=g),
        "mask": mask,  # every rank's half has the same number of real entries
        "pos": torch.randint(0, 50, (b, CFG.window_size, 3), generator=g),
    }


def _fresh_model() -> SaneModel:
    torch.manual_seed(0)
    return SaneModel(CFG)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone() for n, p in model.named_parameters()}


def _dcp_round_trip(model: SaneModel, world: int, out_dir: str) -> dict:
    """One optimizer step, then a DCP round trip into a differently initialized FSDP2 model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opt, sched = build_optimizer(model, OptimConfig(lr=1e-2), total_steps=10)
    opt.step()
    sched.step()
    state = TrainState(model, opt, sched, epoch=1, history=[{"epoch": 1.0}])
    ckpt = os.path.join(out_dir, "ckpt")
    save_train_state(state, ckpt)
    torch.manual_seed(123)
    other = SaneModel(CFG)
    apply_fsdp(other, data_parallel_mesh("cpu", world))
    other_opt, other_sched = build_optimizer(other, OptimConfig(lr=1e-2), total_steps=10)
    restored = TrainState(other, other_opt, other_sched)
    load_train_state(restored, ckpt)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "after_step": get_model_state_dict(model, options=opts),
        "restored": get_model_state_dict(other, options=opts),
        "restored_epoch": restored.epoch,
        "restored_history": restored.history,
        "restored_lr": other_sched.get_last_lr(),
        "lr": sched.get_last_lr(),
    }


def _one_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """A one-worker Ray Train run's process group: the checkpoint is saved without
    coordination (sane_ray.train.checkpoint) and loaded with it."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        torch.set_num_threads(1)
        model = _fresh_model()
        apply_fsdp(model, data_parallel_mesh("cpu", 1))
        compute_loss(model, _batch(WORLD * LOCAL_B), CFG, select_runtime(use_gpu=False)).total.backward()
        torch.save(_dcp_round_trip(model, 1, out_dir), os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where a joinable gloo thread now and then aborts


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        runtime = select_runtime(use_gpu=False)
        model = _fresh_model()
        apply_fsdp(model, data_parallel_mesh("cpu", WORLD))
        full = _batch(WORLD * LOCAL_B)
        local = {k: v[rank * LOCAL_B:(rank + 1) * LOCAL_B] for k, v in full.items()}
        out = {}
        for name, gather in (("local", None), ("gathered", gather_rows)):
            model.zero_grad(set_to_none=True)
            compute_loss(model, local, CFG, runtime, gather=gather).total.backward()
            out[name] = _grads(model)
        out.update(_dcp_round_trip(model, WORLD, out_dir))
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where a joinable gloo thread now and then aborts


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return torch.load(d / "rank0.pt", weights_only=False)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp1")
    mp.spawn(_one_rank_worker, args=(str(d / "init"), str(d)), nprocs=1, join=True)
    return torch.load(d / "rank0.pt", weights_only=False)


def _single_process_grads(batch):
    model = _fresh_model()
    compute_loss(model, batch, CFG, select_runtime(use_gpu=False)).total.backward()
    return _grads(model)


def test_fsdp_gradients_are_the_mean_over_ranks(fsdp_run):
    full = _batch(WORLD * LOCAL_B)
    per_rank = [
        _single_process_grads({k: v[r * LOCAL_B:(r + 1) * LOCAL_B] for k, v in full.items()}) for r in range(WORLD)
    ]
    got = fsdp_run["local"]
    assert got.keys() == per_rank[0].keys()
    for name, g in got.items():
        expected = torch.stack([p[name] for p in per_rank]).mean(0)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6, msg=name)
    # the two ranks' batches differ, so a sum (the upstream gloo bug) would not pass
    assert not torch.allclose(per_rank[0]["encoder.inp.weight"], per_rank[1]["encoder.inp.weight"])


def test_gathered_contrastive_gradients_equal_the_global_batch(fsdp_run):
    full = _batch(WORLD * LOCAL_B)
    expected = _single_process_grads(full)
    for name, g in fsdp_run["gathered"].items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    # without gathering the head sees other negatives, so its gradient differs
    assert not torch.allclose(fsdp_run["local"]["head.fc1.weight"], expected["head.fc1.weight"], atol=1e-6)


@pytest.mark.parametrize("run", ["fsdp_run", "one_rank_run"])
def test_dcp_round_trip_under_fsdp(run, request):
    fsdp_run = request.getfixturevalue(run)
    after, restored = fsdp_run["after_step"], fsdp_run["restored"]
    assert after.keys() == _fresh_model().state_dict().keys()
    for name, t in after.items():
        assert torch.equal(t, restored[name]), name
    assert fsdp_run["restored_epoch"] == 1 and fsdp_run["restored_history"] == [{"epoch": 1.0}]
    assert fsdp_run["restored_lr"] == fsdp_run["lr"]
