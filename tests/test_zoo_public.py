"""Public model-zoo layout (Ray Tune trial directories), read in place locally and on S3."""

from __future__ import annotations

import math

import pytest
import torch
import zoo_builders as zb

from sane_ray import storage
from sane_ray.zoo.architectures import UnknownArchitectureError
from sane_ray.zoo.info import format_info, zoo_info
from sane_ray.zoo.public import architecture_from_params, params_json, parse_results
from sane_ray.zoo.reader import load_checkpoint, open_zoo


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    return zb.root_uri(request.param, tmp_path, s3)


def test_read_in_place_bit_identical(root):
    states = zb.build_public_zoo(root, n_models=3, epochs=2, nlin="ReLU")
    zoo = open_zoo(root)
    assert (zoo.format, zoo.uri, zoo.skipped) == ("public", root, [])
    assert [m.model_id for m in zoo.models] == sorted(states)
    for i, model in enumerate(zoo.models):
        assert model.architecture == "cnn_mnist_public"
        assert model.arch_kwargs == {"activation": "relu", "num_classes": 10, "in_channels": 1}
        assert model.hparams == zb.public_params(i, nlin="ReLU")  # params.json as is
        assert model.epochs == [0, 1, 2]
        for ckpt in model.checkpoints:
            assert ckpt.uri == storage.join(root, model.model_id, f"checkpoint_{ckpt.epoch:06d}", "checkpoints")
            loaded = load_checkpoint(model, ckpt)
            assert loaded.keys() == states[model.model_id][ckpt.epoch].keys()
            assert all(torch.equal(t, states[model.model_id][ckpt.epoch][k]) for k, t in loaded.items())
        # checkpoint N <- the result line with training_iteration N; the initialization has none
        assert all(math.isnan(v) for v in model.checkpoints[0].metrics.values())
        for ckpt in model.checkpoints[1:]:
            want = zb.fake_metrics(i, ckpt.epoch)
            assert ckpt.metrics["test_acc"] == want["test_acc"]
            assert ckpt.metrics["ggap"] == pytest.approx(want["train_acc"] - want["test_acc"])
    info = zoo_info(zoo)
    assert (info["models"], info["checkpoints"], info["epochs"]) == (3, 9, {"min": 0, "max": 2})
    assert info["accuracy"]["median"] == zb.fake_metrics(1, 2)["test_acc"]


def test_listing_does_not_open_checkpoints(root, monkeypatch):
    """Every checkpoint file is garbage: listing still works, verification rejects them all."""
    states = zb.build_public_zoo(root, n_models=2, epochs=1)
    for name in states:
        for epoch in (0, 1):
            zb.put(root, f"{name}/checkpoint_{epoch:06d}/checkpoints", b"\x00garbage")
    opened = zb.record_local_opens(monkeypatch)
    zoo = open_zoo(root)
    assert zoo.num_checkpoints == 4 and zoo.skipped == []
    assert not any("checkpoint_" in p for p in opened)
    if not root.startswith("s3://"):
        assert sorted(p.rsplit("/", 1)[-1] for p in opened) == ["params.json"] * 2 + ["result.json"] * 2
    verified = open_zoo(root, verify=True)
    assert verified.models == [] and len(verified.skipped) == 6  # 4 checkpoints + 2 emptied models


def test_resnet_and_cifar_cnn(tmp_path):
    root = str(tmp_path / "zoo")
    cnn = zb.trajectory("cnn_cifar_public", seed=0, epochs=0)
    zb.write_public_model(root, "cifar_cnn", zb.public_params(0, "cnn_cifar_public"), zb.result_lines(0, 0), cnn)
    resnet_params = {**zb.public_params(1, "resnet18"), "model::type": "ResNet18"}
    resnet = zb.trajectory("resnet18", {"in_channels": 3}, seed=1, epochs=0, step=0.0)
    zb.write_public_model(root, "resnet", resnet_params, zb.result_lines(1, 0), resnet)
    zoo = open_zoo(root, verify=True)
    assert [(m.model_id, m.architecture) for m in zoo.models] == [("cifar_cnn", "cnn_cifar_public"),
                                                                  ("resnet", "resnet18")]
    loaded = load_checkpoint(zoo.models[1], zoo.models[1].checkpoints[0])
    assert loaded["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(loaded["layer4.1.conv2.weight"], resnet[0]["layer4.1.conv2.weight"])


def test_unpadded_checkpoint_directories(tmp_path):
    root = str(tmp_path / "zoo")
    states = zb.trajectory("cnn_mnist_public", seed=3, epochs=10, step=0.01)
    zb.write_public_model(root, "m", zb.public_params(3), zb.result_lines(3, 10), [])
    for epoch in (0, 2, 10):
        zb.put(root, f"m/checkpoint_{epoch}/checkpoints", zb.torch_bytes(states[epoch]))
    zb.put(root, "m/checkpoint_000010/checkpoints", zb.torch_bytes(states[10]))  # same epoch twice
    zoo = open_zoo(root)
    (model,) = zoo.models
    assert model.epochs == [0, 2, 10]
    assert model.last.uri.endswith("/m/checkpoint_000010/checkpoints")
    assert [(s.path.rsplit("/", 1)[-1], s.reason) for s in zoo.skipped] == [
        ("checkpoint_10", "another checkpoint directory already holds epoch 10")]
    assert torch.equal(load_checkpoint(model, model.last)["module_list.0.bias"], states[10]["module_list.0.bias"])


@pytest.mark.parametrize("params, arch, kwargs", [
    ({"model::type": "CNN", "model::channels_in": 1, "model::nlin": "tanh", "model::o_dim": 10},
     "cnn_mnist_public", {"activation": "tanh", "num_classes": 10, "in_channels": 1}),
    ({"model::type": "cnn", "model::channels_in": 3, "model::nlin": "GELU"},
     "cnn_cifar_public", {"activation": "gelu", "in_channels": 3}),
    ({"model::type": "Resnet18", "model::channels_in": 3, "model::o_dim": 100, "model::nlin": "relu"},
     "resnet18", {"num_classes": 100, "in_channels": 3}),
    ({"model::type": "RESNET34", "model::o_dim": 10}, "resnet34", {"num_classes": 10}),
    # a registry name (make-zoo --format public): every architecture key, model::dropout included
    ({"model::type": "cnn_digits", "model::nlin": "SiLU", "model::dropout": 0.1, "model::o_dim": 10,
      "optim::lr": 1e-3}, "cnn_digits", {"activation": "silu", "dropout": 0.1, "num_classes": 10}),
    ({"model::type": "CNN", "model::channels_in": 1, "model::dropout": 0.2},  # the public CNN takes no dropout
     "cnn_mnist_public", {"in_channels": 1}),
])
def test_architecture_mapping(params, arch, kwargs):
    assert architecture_from_params(params) == (arch, kwargs)


@pytest.mark.parametrize("params, error, message", [
    ({"model::type": "VGG11"}, UnknownArchitectureError, "model::type='VGG11'"),
    ({}, UnknownArchitectureError, "model::type=None"),
    ({"model::type": "CNN", "model::channels_in": 2}, UnknownArchitectureError, "2 input channels"),
    ({"model::type": "CNN"}, ValueError, "without model::channels_in"),
    ({"model::type": "CNN", "model::channels_in": "three"}, ValueError, "unusable model::channels_in='three'"),
    ({"model::type": "mlp_digits", "model::dropout": "lots"}, ValueError, "unusable model::dropout='lots'"),
])
def test_architecture_mapping_errors(params, error, message):
    with pytest.raises(error, match=message):
        architecture_from_params(params)


def test_params_json_reads_back_as_written():
    kwargs = {"activation": "gelu", "dropout": 0.2, "num_classes": 10}
    params = params_json("cnn_digits_bn", kwargs, {"lr": 3e-3, "weight_decay": 1e-4, "epochs": 5, "index": 2})
    assert architecture_from_params(params) == ("cnn_digits_bn", kwargs)
    assert (params["model::type"], params["optim::lr"], params["optim::wd"], params["training::epochs_train"],
            params["index"]) == ("cnn_digits_bn", 3e-3, 1e-4, 5, 2)
    with pytest.raises(ValueError, match="would read back as"):  # the reader lower-cases activations
        params_json("cnn_digits", {"activation": "GELU"}, {})
    with pytest.raises(ValueError, match="would read back as"):  # no params.json key for it
        params_json("mlp_digits", {"hidden": [8]}, {})


def test_parse_results():
    text = '{"training_iteration": 1, "test_acc": 0.5}\n\n{"training_iteration": 2, "test_acc": 0.6}\n'
    assert {k: v["test_acc"] for k, v in parse_results(text).items()} == {1: 0.5, 2: 0.6}
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        parse_results('{"training_iteration": 1}\n{"training_it')
    with pytest.raises(ValueError, match="line 1 has no integer training_iteration"):
        parse_results('{"test_acc": 0.5}\n')


def test_format_info_text(tmp_path):
    root = str(tmp_path / "zoo")
    zb.build_public_zoo(root, n_models=2, epochs=1)
    text = format_info(zoo_info(open_zoo(root)))
    assert f"zoo:          {root} (public layout)" in text
    assert "checkpoints:  4 (2 per model)" in text
    assert "cnn_mnist_public x2" in text
    assert "median 0.3050" in text  # final test_acc of the two models: 0.30 and 0.31
    assert "skipped:      0" in text
