"""Digits tasks and zoo generation as Ray tasks (local disk and S3)."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as safetensors_load

from sane_ray import storage
from sane_ray.config import load_config
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.generate import ZooExistsError, ZooGenerationError, ensure_zoo, generate_zoo
from sane_ray.zoo.plan import SearchSpace, ZooGenConfig, default_zoo_config, plan_models, zoo_uri
from sane_ray.zoo.trainer import initialize, train_model
from sane_ray.zoo.info import format_info, zoo_info
from sane_ray.zoo.native import MANIFEST
from sane_ray.zoo.reader import load_checkpoint, open_zoo
from sane_ray.zoo.tasks import DIGITS8_TASKS, LABEL_PERMUTATION, UnknownTaskError, evaluate, get_task, split_indices

# A space where every model learns within 3 epochs, so "beats chance" holds for each one.
RELIABLE = SearchSpace(lr=[3e-3, 1e-2], activation=["tanh", "gelu", "silu"],
                       init=["default", "kaiming_uniform", "xavier_uniform"])
TINY = dict(models=3, epochs=3, seed=7, space=RELIABLE)


# ---------------------------------------------------------------- tasks


def test_tasks_shapes_and_standardization():
    for name in DIGITS8_TASKS:
        task = get_task(name)
        assert task.num_classes == 10 and task.input_shape == (1, 8, 8)
        for split in (task.train, task.val, task.test):
            assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
            assert split.x.shape == (len(split), 1, 8, 8)
            assert set(split.y.unique().tolist()) == set(range(10))
        assert (len(task.train), len(task.val), len(task.test)) == (1078, 359, 360)
        assert abs(float(task.train.x.mean())) < 1e-5 and abs(float(task.train.x.std()) - 1) < 1e-3


def test_digits28_is_the_digits_at_mnist_size():
    small, big = get_task("digits"), get_task("digits28")
    assert big.input_shape == (1, 28, 28) and big.train.x.shape == (1078, 1, 28, 28)
    assert torch.equal(big.test.y, small.test.y)  # the same images in the same splits
    assert big.normalization.divisor == 1 and big.normalization.stats == "train" and len(big.normalization.mean) == 1
    assert abs(float(big.train.x.mean())) < 1e-4 and abs(float(big.train.x.std()) - 1) < 1e-3


def test_splits_deterministic_disjoint_stratified():
    train, val, test = split_indices()
    assert len(np.intersect1d(train, val)) == len(np.intersect1d(train, test)) == len(np.intersect1d(val, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(1797))
    a, b = get_task("digits"), get_task("digits")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    counts = torch.bincount(a.train.y, minlength=10).float() / len(a.train)
    overall = torch.bincount(torch.cat([a.train.y, a.val.y, a.test.y]), minlength=10).float() / 1797
    assert torch.allclose(counts, overall, atol=0.01)
    other = split_indices(1)[0]
    assert not np.array_equal(other, train)


def test_transfer_tasks_relate_to_digits():
    base, tr, perm = get_task("digits"), get_task("digits_transposed"), get_task("digits_permuted")
    assert torch.equal(tr.train.x, base.train.x.transpose(2, 3))
    assert torch.equal(tr.train.y, base.train.y)
    assert torch.equal(perm.test.x, base.test.x)
    assert torch.equal(perm.test.y, torch.tensor(LABEL_PERMUTATION)[base.test.y])
    assert not torch.equal(perm.test.y, base.test.y)


def test_unknown_task_lists_known():
    with pytest.raises(UnknownTaskError, match="digits_permuted"):
        get_task("mnist")


# ---------------------------------------------------------------- config and plans


def test_plans_deterministic_and_varied():
    cfg = ZooGenConfig(models=48)
    plans = plan_models(cfg)
    assert plans == plan_models(ZooGenConfig(models=48))
    assert plan_models(ZooGenConfig(models=48, seed=1)) != plans
    assert plans[:3] == plan_models(ZooGenConfig(models=3))  # a model's draw depends on its index only
    for key in ("activation", "dropout"):
        assert len({p.arch_kwargs[key] for p in plans}) > 1, key
    for key in ("seed", "lr", "weight_decay", "init"):
        assert len({p.hparams[key] for p in plans}) > 1, key
    assert all(cfg.space.lr[0] <= p.hparams["lr"] <= cfg.space.lr[1] for p in plans)


def test_config_from_overrides_and_validation(monkeypatch, tmp_path):
    cfg = load_config(ZooGenConfig, overrides=["models=5", "arch=mlp_digits", "space.activation=[tanh]"])
    assert (cfg.models, cfg.arch, cfg.space.activation) == (5, "mlp_digits", ["tanh"])
    monkeypatch.setenv("SANE_RAY_CACHE", str(tmp_path))
    assert zoo_uri(cfg) == str(tmp_path / "zoos" / "digits-mlp_digits-5x10-s0")
    for bad, match in [
        (dict(arch="resnet18"), "8x8"), (dict(arch="nope"), "registered"), (dict(task="nope"), "known tasks"),
        (dict(models=0), "models"), (dict(epochs=-1), "epochs"),
    ]:
        with pytest.raises((ValueError, KeyError), match=match):
            ZooGenConfig(**bad).validate()
    with pytest.raises(ValueError, match="space.init"):
        load_config(ZooGenConfig, overrides=["space.init=[orthogonal]"]).validate()


# ---------------------------------------------------------------- generation (Ray)


def _manifest(root: str):
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, MANIFEST))))


def test_zoo_local_and_s3_identical(ray_cluster, s3, tmp_path):
    local = generate_zoo(ZooGenConfig(out=str(tmp_path / "zoo"), **TINY), progress=False)
    remote = generate_zoo(ZooGenConfig(out=f"s3://{s3['bucket']}/zoo", **TINY), progress=False)
    assert remote == f"s3://{s3['bucket']}/zoo"
    a, b = _manifest(local), _manifest(remote)
    assert a.num_rows == TINY["models"] * (TINY["epochs"] + 1)
    assert a.schema.metadata == b.schema.metadata
    assert a.equals(b)  # same rows, same SHA-256 of every checkpoint file
    for rel in a.column("path").to_pylist():
        assert storage.read_bytes(storage.join(local, rel)) == storage.read_bytes(storage.join(remote, rel))

    zoo = open_zoo(local, verify=True)  # every checkpoint loads and passes the reader's checks
    assert not zoo.skipped and zoo.metadata["generation"] == ZooGenConfig(**TINY).identity()
    assert zoo.task == "digits" and "task:         digits" in format_info(zoo_info(zoo))  # the samplers' default
    task = get_task("digits")
    for plan, rec in zip(plan_models(ZooGenConfig(**TINY)), zoo.models, strict=True):
        assert (rec.model_id, rec.architecture, rec.arch_kwargs, rec.hparams) == (
            plan.model_id, plan.arch, plan.arch_kwargs, plan.hparams)
        assert rec.epochs == list(range(TINY["epochs"] + 1))
        first, last = (load_checkpoint(rec, c) for c in (rec.checkpoints[0], rec.last))
        # Epoch 0 is the initialization: the same seed rebuilds it exactly.
        torch.manual_seed(plan.seed)
        init = build_model(plan.arch, **plan.arch_kwargs)
        initialize(init, plan.hparams["init"])
        assert all(torch.equal(v, first[k]) for k, v in init.state_dict().items())
        assert not torch.equal(last["module_list.0.weight"], first["module_list.0.weight"])
        # Recorded metrics are those of the stored weights.
        model = build_model(plan.arch, **plan.arch_kwargs)
        model.load_state_dict(last)
        acc, loss = evaluate(model, task.test)
        m = rec.last.metrics
        assert m["test_acc"] == acc and m["test_loss"] == pytest.approx(loss)
        assert m["ggap"] == pytest.approx(m["train_acc"] - m["test_acc"])
        assert m["test_acc"] > 0.5  # chance is 0.1


@pytest.mark.parametrize("arch", ["cnn_digits_bn", "mlp_digits", "vit_digits"])
def test_train_model_other_architectures(arch, tmp_path):
    plan = plan_models(ZooGenConfig(arch=arch, **{**TINY, "models": 1, "epochs": 2}))[0]
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    rows = train_model(plan, get_task("digits"), str(tmp_path))
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)  # caller untouched
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[-1]["test_acc"] > 0.5
    state = safetensors_load((tmp_path / rows[-1]["path"]).read_bytes())
    assert state.keys() == build_model(arch, **plan.arch_kwargs).state_dict().keys()
    if arch == "cnn_digits_bn":  # running statistics are part of the checkpoint and were updated
        assert int(state["module_list.1.num_batches_tracked"]) == 2 * math.ceil(1078 / plan.batch_size)
    with pytest.raises(ValueError, match="planned for task"):
        train_model(plan, get_task("digits_permuted"), str(tmp_path))


def test_seed_changes_zoo_and_overwrite_rules(ray_cluster, tmp_path):
    out = str(tmp_path / "zoo")
    cfg = ZooGenConfig(out=out, **TINY)
    generate_zoo(cfg, progress=False)
    first = _manifest(out)
    with pytest.raises(ZooExistsError, match="overwrite"):
        generate_zoo(cfg, progress=False)

    manifest = os.path.join(out, MANIFEST)
    stamp = os.stat(manifest).st_mtime_ns
    assert ensure_zoo(cfg, progress=False) == out  # same config: reused, not retrained
    assert os.stat(manifest).st_mtime_ns == stamp

    other = ZooGenConfig(out=out, **{**TINY, "seed": 8, "models": 2})
    with pytest.raises(ZooExistsError, match="seed"):
        ensure_zoo(other, progress=False)
    other.overwrite = True
    ensure_zoo(other, progress=False)
    second = _manifest(out)
    assert second.num_rows == 2 * (TINY["epochs"] + 1)
    assert second.column("sha256").to_pylist()[0] != first.column("sha256").to_pylist()[0]
    # the new zoo was written beside the old one (next/), which is gone once the new manifest is published
    assert sorted(os.listdir(out)) == [MANIFEST, "next"]
    assert sorted(os.listdir(os.path.join(out, "next", "models"))) == ["model_0000", "model_0001"]


def test_failed_task_publishes_nothing(ray_cluster, tmp_path):
    out = tmp_path / "zoo"
    # A directory where model_0001's epoch-1 checkpoint must go makes that write fail.
    blocker = out / "models" / "model_0001" / "epoch_0001.safetensors"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("x")
    with pytest.raises(ZooGenerationError, match="model_0001.*no manifest"):
        generate_zoo(ZooGenConfig(out=str(out), **TINY), progress=False)
    assert not (out / MANIFEST).exists()


def test_default_zoo_config_is_valid():
    cfg = default_zoo_config()
    cfg.validate()
    assert (cfg.arch, cfg.task) == ("cnn_digits", "digits") and cfg.models >= 32 and cfg.epochs >= 5
