"""The ResNet-scale zoo: the 32x32 RGB digits task, ResNets in make-zoo's config and plans, one
ResNet trained and published as make-zoo does (without Ray)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load as safetensors_load

from sane_ray.cli import main
from sane_ray.zoo import tasks
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.native import publish_manifest
from sane_ray.zoo.plan import ZooGenConfig, plan_models
from sane_ray.zoo.public import architecture_from_params, params_json
from sane_ray.zoo.reader import load_checkpoint, open_zoo
from sane_ray.zoo.tasks import TASKS, Split, UnknownTaskError, evaluate, get_task, split_indices
from sane_ray.zoo.trainer import initialize, train_model

RESNET = dict(task="digits32_rgb", arch="resnet18")


# ---------------------------------------------------------------- the task


def test_rgb_task_shapes_normalization_and_digits_splits():
    task, digits = get_task("digits32_rgb"), get_task("digits")
    assert (task.num_classes, task.input_shape) == (10, (3, 32, 32))
    raw = tasks._digits32_rgb_images(0)
    mean, std = raw[split_indices(0)[0]].mean(axis=(0, 2, 3)), raw[split_indices(0)[0]].std(axis=(0, 2, 3))
    for name, idx in zip(("train", "val", "test"), split_indices(0), strict=True):
        split = task.split(name)
        assert split.x.dtype == torch.float32 and split.x.shape == (len(idx), 3, 32, 32)
        assert torch.equal(split.y, digits.split(name).y)  # the digits' samples, split alike
        expected = (raw[idx] - mean[:, None, None]) / std[:, None, None]
        assert np.allclose(split.x.numpy(), expected, atol=1e-5)
    per_channel = task.train.x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(1).abs().max() < 1e-4 and (per_channel.std(1) - 1).abs().max() < 1e-3
    assert "digits32_rgb" in TASKS
    with pytest.raises(UnknownTaskError, match="digits32_rgb"):
        get_task("cifar10")


def test_rgb_task_is_deterministic_and_seeded_per_image():
    a, b = get_task("digits32_rgb"), get_task("digits32_rgb")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert a.train.x.data_ptr() != b.train.x.data_ptr()  # fresh tensors; the raw images are cached
    # Image i depends on (split_seed, i) only: the first images' draws match those of a longer run.
    short, full = tasks._rgb_draws(0, 5), tasks._rgb_draws(0, 50)
    assert all(np.array_equal(s, f[:5]) for s, f in zip(short, full, strict=True))
    other = tasks._rgb_draws(1, 5)
    assert not np.array_equal(other[1], short[1])


def test_rgb_digit_contrasts_with_its_background():
    shift, background, foreground, noise = tasks._rgb_draws(0, 400)
    assert shift.min() >= 0 and shift.max() <= 2 * tasks.RGB_MAX_SHIFT
    assert np.abs(foreground - background).min() >= 1 - 2 * tasks.RGB_TONE - 1e-6  # every channel, every image
    light = foreground.mean(1) > background.mean(1)
    assert 0.3 < light.mean() < 0.7  # both polarities
    assert abs(float(noise.std()) - tasks.RGB_NOISE_STD) < 0.01


# ---------------------------------------------------------------- config and plans


@pytest.mark.parametrize("cfg, message", [
    (dict(task="digits32_rgb", arch="cnn_digits"),
     "arch 'cnn_digits' takes 1x8x8 inputs but task 'digits32_rgb' has 3x32x32; architectures for 3x32x32: "
     "cnn_cifar_public, resnet18, resnet34"),
    (dict(task="digits", arch="resnet18"),
     "arch 'resnet18' takes 3x32x32 inputs but task 'digits' has 1x8x8; architectures for 1x8x8: "
     "cnn_digits, cnn_digits_bn, cnn_digits_wide, mlp_digits, vit_digits, resnet_digits"),
    (dict(RESNET, width=0), "width must be >= 1, got 0"),
])
def test_validation_refuses_an_architecture_of_another_input(cfg, message):
    with pytest.raises(ValueError) as e:
        ZooGenConfig(**cfg).validate()
    assert str(e.value) == message


def test_resnet_plans_take_what_the_builder_takes():
    cfg = ZooGenConfig(models=12, **RESNET)
    cfg.validate()
    plans = plan_models(cfg)
    assert {tuple(sorted(p.arch_kwargs.items())) for p in plans} == {(("num_classes", 10), ("width", 8))}
    assert sum(p.numel() for p in build_model("resnet18", **plans[0].arch_kwargs).parameters()) == 176_402
    for key in ("seed", "lr", "weight_decay", "init"):
        assert len({p.hparams[key] for p in plans}) > 1, key
    # The other draws do not depend on the architecture: the digits zoo of the same seed draws alike.
    assert [p.hparams | {"task": 0} for p in plans] == [
        p.hparams | {"task": 0} for p in plan_models(ZooGenConfig(models=12))]
    assert cfg.identity()["width"] == 8 and cfg.identity()["task"] == "digits32_rgb"
    assert "width" not in ZooGenConfig().identity()  # a digits zoo's identity is what it was
    assert plan_models(ZooGenConfig(task="digits32_rgb", arch="cnn_cifar_public", models=1))[0].arch_kwargs.keys() \
        == {"activation", "num_classes"}


def test_resnet_kwargs_round_trip_through_the_public_layout():
    plan = plan_models(ZooGenConfig(models=1, width=4, **RESNET))[0]
    params = params_json(plan.arch, plan.arch_kwargs, plan.hparams)
    assert params["model::width"] == 4
    assert architecture_from_params(params) == ("resnet18", plan.arch_kwargs)
    assert architecture_from_params({"model::type": "ResNet18", "model::o_dim": 10}) == (
        "resnet18", {"num_classes": 10})  # a public ResNet zoo: the builder's width (64)


# ---------------------------------------------------------------- one model trained and published


def _small(task: tasks.Task, n: int) -> tasks.Task:
    cut = lambda s: Split(s.x[:n].contiguous(), s.y[:n].contiguous())  # noqa: E731
    return dataclasses.replace(task, train=cut(task.train), val=cut(task.val), test=cut(task.test))


def test_train_resnet_writes_checkpoints_that_reload(tmp_path, capsys):
    cfg = ZooGenConfig(models=1, epochs=2, width=4, batch_size=64, **RESNET)
    plan = plan_models(cfg)[0]
    task = _small(get_task("digits32_rgb"), 192)
    rows = train_model(plan, task, str(tmp_path))
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    state = safetensors_load((tmp_path / rows[-1]["path"]).read_bytes())
    assert int(state["bn1.num_batches_tracked"]) == 2 * math.ceil(192 / 64)  # BN statistics were trained and kept

    publish_manifest(str(tmp_path), rows, metadata={"generation": cfg.identity()})
    zoo = open_zoo(str(tmp_path), verify=True)
    (rec,) = zoo.models
    assert (rec.architecture, rec.arch_kwargs, rec.epochs) == ("resnet18", {"width": 4, "num_classes": 10}, [0, 1, 2])
    torch.manual_seed(plan.seed)  # epoch 0 is the initialization: the same seed rebuilds it
    init = build_model(plan.arch, **plan.arch_kwargs)
    initialize(init, plan.hparams["init"])
    first = load_checkpoint(rec, rec.checkpoints[0])
    assert all(torch.equal(v, first[k]) for k, v in init.state_dict().items())
    model = build_model(plan.arch, **plan.arch_kwargs)
    model.load_state_dict(load_checkpoint(rec, rec.last))  # strict: every key, BN buffers included
    assert evaluate(model, task.test)[0] == rec.last.metrics["test_acc"]

    assert main(["zoo", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "task:         digits32_rgb" in out and "resnet18 x1" in out
