"""NT-Xent never uses another window or checkpoint of the anchor's own model as a negative:
locally, and with negatives gathered from 2 gloo processes whose batches share a model."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sane_ray.model import SaneModel, nt_xent, sane_loss, tiny
from sane_ray.train.distributed import gather_rows
from sane_ray.train.runtime import select_runtime
from sane_ray.train.step import compute_loss

T = 0.3


def _naive_anchor(p_i: torch.Tensor, p_j: torch.Tensor, ids: list[int], a: int, t: float = T) -> float:
    """One anchor's loss by the definition: the denominator skips the anchor itself and
    every view of another window of its model."""
    z = torch.cat([p_i, p_j]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n = p_i.shape[0]
    w, pos = a % n, (a + n) % (2 * n)
    keys = [c for c in range(2 * n) if c != a and (c % n == w or ids[c % n] != ids[w])]
    denom = sum(math.exp(float(z[a] @ z[c]) / t) for c in keys)
    return -math.log(math.exp(float(z[a] @ z[pos]) / t) / denom)


def _naive_masked(p_i: torch.Tensor, p_j: torch.Tensor, ids: list[int], t: float = T) -> float:
    n = p_i.shape[0]
    return sum(_naive_anchor(p_i, p_j, ids, a, t) for a in range(2 * n)) / (2 * n)


def _projections(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)


def test_masked_loss_equals_its_definition():
    p_i, p_j = _projections(5)
    ids = [3, 7, 3, 1, 7]  # windows 0 and 2, and 1 and 4, are of one model
    got = nt_xent(p_i, p_j, T, model_ids=torch.tensor(ids))
    assert got.item() == pytest.approx(_naive_masked(p_i, p_j, ids, T), rel=1e-5)
    unmasked = nt_xent(p_i, p_j, T)
    assert unmasked.item() == pytest.approx(_naive_masked(p_i, p_j, [0, 1, 2, 3, 4], T), rel=1e-5)
    assert got.item() != pytest.approx(unmasked.item(), rel=1e-3)
    # the same with the keys given explicitly (a gathered global batch, local block at offset 2)
    blocks = nt_xent(p_i[2:4], p_j[2:4], T, keys=(p_i, p_j), offset=2,
                     model_ids=torch.tensor(ids[2:4]), key_model_ids=torch.tensor(ids))
    assert blocks.item() == pytest.approx(
        sum(_naive_anchor(p_i, p_j, ids, a) for a in (2, 3, 7, 8)) / 4, rel=1e-5)  # windows 2, 3, both views


def test_same_model_keys_get_no_weight():
    """Both local windows and a gathered key come from model 5: the key's projection changes
    nothing, and each local window's loss is the one it has without the other window."""
    all_i, all_j = _projections(4, seed=1)
    ids = torch.tensor([5, 5, 5, 2])

    def loss(keys_i, keys_j, with_ids=True):
        kw = {"model_ids": ids[:2], "key_model_ids": ids} if with_ids else {}
        return nt_xent(all_i[:2], all_j[:2], T, keys=(keys_i, keys_j), offset=0, **kw).item()

    moved_i, moved_j = all_i.clone(), all_j.clone()
    moved_i[2], moved_j[2] = torch.randn(8), torch.randn(8)
    assert loss(moved_i, moved_j) == pytest.approx(loss(all_i, all_j), rel=1e-6)
    assert loss(moved_i, moved_j, with_ids=False) != pytest.approx(loss(all_i, all_j, with_ids=False), rel=1e-4)
    alone = [
        nt_xent(all_i[w:w + 1], all_j[w:w + 1], T, keys=(all_i[[w, 2, 3]], all_j[[w, 2, 3]]), offset=0,
                model_ids=ids[w:w + 1], key_model_ids=ids[[w, 2, 3]]).item()
        for w in (0, 1)
    ]
    assert loss(all_i, all_j) == pytest.approx(sum(alone) / 2, rel=1e-6)


def test_the_step_passes_model_ids():
    cfg = dataclasses.replace(tiny(), window_size=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, cfg.d_t, generator=g)
    batch = {"x_i": x, "x_j": x + 0.1, "mask": torch.ones_like(x, dtype=torch.bool),
             "pos": torch.randint(0, 20, (4, 4, 3), generator=g)}
    torch.manual_seed(0)
    model = SaneModel(cfg).eval()
    runtime = select_runtime(use_gpu=False)
    distinct = compute_loss(model, {**batch, "model_idx": torch.arange(4)}, cfg, runtime).contrastive
    assert distinct.item() == pytest.approx(compute_loss(model, batch, cfg, runtime).contrastive.item())
    shared = compute_loss(model, {**batch, "model_idx": torch.tensor([0, 0, 1, 1])}, cfg, runtime).contrastive
    assert shared.item() < distinct.item()  # fewer negatives in every denominator


WORLD, LOCAL_B = 2, 3
# rank 0 holds windows of models 10, 11, 12; rank 1 of 13, 10, 14: model 10 is on both ranks
IDS = torch.tensor([10, 11, 12, 13, 10, 14])


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        p_i, p_j = _projections(WORLD * LOCAL_B, seed=2)
        mine = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        x = torch.zeros(2 * LOCAL_B, 2, 2)  # reconstruction is not under test
        parts = sane_loss(x, x, torch.ones_like(x, dtype=torch.bool), p_i[mine], p_j[mine], 1.0, T,
                          gather=gather_rows, model_ids=IDS[mine])
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, parts.contrastive.detach())
        if rank == 0:
            torch.save(torch.stack(losses), out_file)
    finally:
        dist.destroy_process_group()
    # The result is saved. Skip interpreter teardown: a gloo thread still joinable there
    # aborts the process now and then ("terminate called without an active exception").
    os._exit(0)


def test_gathered_negatives_exclude_the_same_model_on_another_worker(tmp_path):
    out = tmp_path / "losses.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    per_rank = torch.load(out)
    p_i, p_j = _projections(WORLD * LOCAL_B, seed=2)
    ids = IDS.tolist()
    n = WORLD * LOCAL_B
    for rank in range(WORLD):
        anchors = [a for w in range(rank * LOCAL_B, (rank + 1) * LOCAL_B) for a in (w, w + n)]
        expected = sum(_naive_anchor(p_i, p_j, ids, a) for a in anchors) / len(anchors)
        assert per_rank[rank].item() == pytest.approx(expected, rel=1e-5)
    assert per_rank.mean().item() == pytest.approx(_naive_masked(p_i, p_j, ids, T), rel=1e-5)
    assert per_rank.mean().item() != pytest.approx(nt_xent(p_i, p_j, T).item(), rel=1e-3)  # the mask mattered
