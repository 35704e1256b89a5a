"""The hf (Hugging Face model directories) and flat (state dicts + sidecar) layouts, read in place locally and on S3."""

from __future__ import annotations

import json
import math

import pytest
import torch
import zoo_builders as zb

from sane_ray import storage
from sane_ray.cli import main
from sane_ray.zoo.architectures import ARCHITECTURES, UnknownArchitectureError
from sane_ray.zoo.checks import ZooError
from sane_ray.zoo.generate import ZooExistsError, generate_zoo
from sane_ray.zoo.hub import METRIC_NAMES, architecture_from_config
from sane_ray.zoo.plan import ZooGenConfig
from sane_ray.zoo.reader import check_zoo, load_checkpoint, open_zoo
from sane_ray.zoo.spec import METRICS


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """``(root, sidecar)``: a fresh zoo root; flat zoos get a CSV sidecar locally and a Parquet one on S3."""
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    return zb.root_uri(request.param, tmp_path, s3), ("metrics.parquet" if s3 else "metrics.csv")


def _same(zoo, states):
    assert [m.model_id for m in zoo.models] == sorted(states)
    for i, model in enumerate(zoo.models):
        assert (model.architecture, model.arch_kwargs) == ("cnn_digits", {"activation": ("relu", "tanh")[i % 2]})
        assert model.epochs == [0, 1, 2]
        for ckpt in model.checkpoints:
            loaded, want = load_checkpoint(model, ckpt), states[model.model_id][ckpt.epoch]
            assert loaded.keys() == want.keys() and all(torch.equal(t, want[k]) for k, t in loaded.items())
            assert ckpt.metrics["test_acc"] == zb.fake_metrics(i, ckpt.epoch)["test_acc"]
            assert math.isnan(ckpt.metrics["val_loss"])  # not written: NaN
            assert ckpt.metrics["ggap"] == pytest.approx(0.03)


def test_hf_layout_read_in_place_bit_identical(where):
    root, _ = where
    states = zb.build_hf_zoo(root, n_models=3, epochs=2)
    zoo = open_zoo(root)
    assert (zoo.format, zoo.uri, zoo.skipped, check_zoo(root)) == ("hf", root, [], root)
    _same(zoo, states)
    model = zoo.models[1]
    assert model.hparams == {"transformers_version": "4.46.0", "seed": 1, "learning_rate": 1e-3}
    assert [c.uri for c in model.checkpoints] == [
        storage.join(root, model.model_id, "checkpoint-0", "model.safetensors"),
        storage.join(root, model.model_id, "checkpoint-1", "model.safetensors"),
        storage.join(root, model.model_id, "model.safetensors")]  # the top-level weights: the final checkpoint


def test_flat_layout_read_in_place_bit_identical(where):
    root, sidecar = where
    states = zb.build_flat_zoo(root, n_models=3, epochs=2, sidecar=sidecar)
    zoo = open_zoo(root)
    assert (zoo.format, zoo.uri, zoo.skipped, zoo.metadata) == ("flat", root, [], {"architecture": "cnn_digits"})
    _same(zoo, states)
    model = zoo.models[1]
    assert model.hparams == {"learning_rate": 1e-3, "seed": 1}
    assert [c.uri for c in model.checkpoints] == [storage.join(root, zb.flat_file(model.model_id, e)) for e in range(3)]


@pytest.mark.parametrize("layout", ["hf", "flat"])
def test_listing_does_not_open_checkpoints(layout, tmp_path, monkeypatch):
    """Every weights file is garbage: listing still works and opens only the small files; verifying rejects all."""
    root = str(tmp_path / "zoo")
    if layout == "hf":
        zb.build_hf_zoo(root, n_models=2, epochs=1)
        weights = [f"{m}/{d}model.safetensors" for m in map(zb.hf_model_name, range(2)) for d in ("checkpoint-0/", "")]
    else:
        zb.build_flat_zoo(root, n_models=2, epochs=1)
        weights = [zb.flat_file(zb.hf_model_name(i), e) for i in range(2) for e in range(2)]
    for rel in weights:
        zb.put(root, rel, b"\x00garbage")
    opened = zb.record_local_opens(monkeypatch)
    zoo = open_zoo(root)
    assert zoo.num_checkpoints == 4 and zoo.skipped == []
    names = sorted(p.rsplit("/", 1)[-1] for p in opened)
    assert names == (["config.json"] * 2 + ["metrics.json"] * 4 if layout == "hf" else ["metrics.csv", "zoo.json"])
    verified = open_zoo(root, verify=True)
    assert verified.models == [] and len(verified.skipped) == 6  # 4 checkpoints + 2 emptied models
    decoded = {"hf": ["not a valid safetensors file"] * 4,  # by file type: .safetensors, .pt
               "flat": ["not a valid safetensors file", "torch.load failed"] * 2}[layout]
    assert sorted(s.reason.split(":")[0] for s in verified.skipped) == sorted(["no usable checkpoints"] * 2 + decoded)


def test_hf_trainer_output_dirs(tmp_path):
    """An HF Trainer output dir: steps as epochs, metrics from trainer_state.json and all_results.json,
    the checkpoint at the final step skipped for the top-level weights, Trainer's other files ignored."""
    root = str(tmp_path / "zoo")
    states = zb.trajectory("mlp_digits", {"activation": "gelu"}, seed=0, epochs=3)
    config = {"architectures": ["MlpDigits"], "model_type": "mlp", "activation": "gelu", "num_classes": 10,
              "learning_rate": 5e-5, "torch_dtype": "float32"}
    zb.put(root, "run/config.json", json.dumps(config).encode())
    for step, sd in zip((0, 500, 1000), states):
        zb.put(root, f"run/checkpoint-{step}/model.safetensors", zb.state_bytes(sd))
        zb.put(root, f"run/checkpoint-{step}/optimizer.pt", b"not read")
    zb.put(root, "run/checkpoint-1500/model.safetensors", zb.state_bytes(states[3]))
    zb.put(root, "run/pytorch_model.bin", zb.torch_bytes({"state_dict": states[3], "epoch": 3}))  # unwrapped on load
    zb.put(root, "run/training_args.bin", b"not read")
    log = [{"step": 500, "epoch": 1.0, "loss": 1.5}, {"step": 500, "epoch": 1.0, "eval_loss": 1.2, "eval_accuracy": 0.5},
           {"step": 1500, "epoch": 3.0, "eval_accuracy": 0.7}]
    zb.put(root, "run/trainer_state.json", json.dumps({"global_step": 1500, "log_history": log}).encode())
    zb.put(root, "run/all_results.json", json.dumps({"eval_accuracy": 0.75, "test_accuracy": 0.72}).encode())
    zoo = open_zoo(root, verify=True)
    (model,) = zoo.models
    assert (model.architecture, model.arch_kwargs) == ("mlp_digits", {"activation": "gelu", "num_classes": 10})
    assert model.hparams == {"learning_rate": 5e-5, "torch_dtype": "float32"}
    assert model.epochs == [0, 500, 1000, 1500]
    assert model.last.uri == storage.join(root, "run", "pytorch_model.bin")
    assert [(s.path, s.reason) for s in zoo.skipped] == [(storage.join(root, "run", "checkpoint-1500"),
                                                         "holds step 1500, the step of the top-level weights "
                                                         "(the final checkpoint)")]
    by_step = {c.epoch: c.metrics for c in model.checkpoints}
    assert (by_step[500]["train_loss"], by_step[500]["val_loss"], by_step[500]["val_acc"]) == (1.5, 1.2, 0.5)
    assert all(math.isnan(v) for v in by_step[0].values()) and math.isnan(by_step[1000]["val_acc"])
    assert (by_step[1500]["val_acc"], by_step[1500]["test_acc"]) == (0.75, 0.72)  # all_results over the log
    loaded = load_checkpoint(model, model.last)
    assert all(torch.equal(t, states[3][k]) for k, t in loaded.items())


@pytest.mark.parametrize("config, arch, kwargs", [
    ({"sane_ray_architecture": "cnn_digits_bn", "sane_ray_arch_kwargs": {"channels": 4}, "activation": "tanh"},
     "cnn_digits_bn", {"channels": 4}),  # sane-ray's keys: the top-level activation is a hyperparameter
    ({"architectures": ["Bert", "CnnDigits"], "model_type": "bert", "dropout": 0.1, "hidden_size": 8},
     "cnn_digits", {"dropout": 0.1}),  # the first architectures entry that is registered; hidden_size is not an argument
    ({"model_type": "mlp-digits", "hidden": [8]}, "mlp_digits", {"hidden": [8]}),
])
def test_architecture_from_config(config, arch, kwargs):
    got_arch, got_kwargs, hparams = architecture_from_config(config)
    assert (got_arch, got_kwargs) == (arch, kwargs)
    assert set(hparams) == set(config) - {"sane_ray_architecture", "sane_ray_arch_kwargs", "architectures",
                                          "model_type", *([] if "sane_ray_arch_kwargs" in config else kwargs)}


def test_every_metric_has_its_hf_names():
    assert set(METRIC_NAMES) == set(METRICS) and all(METRIC_NAMES[m][0] == m for m in METRICS)


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert"},
     r"no registered architecture in it \(architectures=\['BertForMaskedLM'\], model_type='bert'\); registered: "
     r"cnn_cifar_public, cnn_digits"),
    ({"sane_ray_architecture": "CnnDigits"}, r"sane_ray_architecture='CnnDigits'"),  # our own key: exact names only
])
def test_architecture_from_config_unknown(config, message):
    with pytest.raises(UnknownArchitectureError, match=message):
        architecture_from_config(config)


def test_hf_bad_model_dirs_are_skipped(tmp_path):
    root = str(tmp_path / "zoo")
    zb.build_hf_zoo(root, n_models=2, epochs=1)
    good = zb.trajectory("cnn_digits", seed=5, epochs=0)[0]
    zb.put(root, "unknown/config.json", json.dumps({"architectures": ["ViTModel"]}).encode())
    zb.put(root, "unknown/model.safetensors", zb.state_bytes(good))
    zb.put(root, "broken/config.json", b"{not json")
    zb.put(root, "broken/model.safetensors", zb.state_bytes(good))
    zb.put(root, "noweights/config.json", json.dumps(zb.hf_config("cnn_digits", {})).encode())
    zb.put(root, "noweights/model.safetensors.index.json", b"{}")
    zb.put(root, f"{zb.hf_model_name(0)}/checkpoint-7/optimizer.pt", b"no weights here")
    zb.put(root, f"{zb.hf_model_name(1)}/checkpoint-0/model.safetensors", zb.state_bytes(good)[:-9])  # truncated
    zoo = open_zoo(root, verify=True)
    assert [m.model_id for m in zoo.models] == [zb.hf_model_name(0), zb.hf_model_name(1)]
    reasons = {s.path.removeprefix(root + "/"): s.reason for s in zoo.skipped}
    assert reasons["unknown"].startswith("config.json: no registered architecture in it (architectures=['ViTModel'])"
                                         "; registered: cnn_cifar_public")
    assert reasons["broken"].startswith("malformed config.json")
    assert reasons["noweights"] == "no weights: neither model.safetensors nor pytorch_model.bin (sharded weights are not read)"
    assert reasons[f"{zb.hf_model_name(0)}/checkpoint-7"] == "no model.safetensors or pytorch_model.bin in the checkpoint directory"
    assert reasons[f"{zb.hf_model_name(1)}/checkpoint-0/model.safetensors"].startswith("not a valid safetensors file")
    assert zoo.models[1].epochs == [1] and len(zoo.skipped) == 5


def test_flat_bad_rows_and_files_are_skipped(tmp_path):
    root = str(tmp_path / "zoo")
    states = {zb.hf_model_name(i): zb.trajectory("cnn_digits", seed=i, epochs=0)[0] for i in range(3)}
    for mid, sd in states.items():
        zb.put(root, f"{mid}.pth", zb.torch_bytes({"state_dict": sd, "epoch": 1}))  # nested: unwrapped on load
    zb.put(root, "corrupt.pt", b"\x00garbage")
    zb.put(root, "stray.pt", zb.torch_bytes(states[zb.hf_model_name(0)]))
    zb.put(root, "mlp.safetensors", zb.state_bytes(zb.trajectory("mlp_digits", seed=0, epochs=0)[0]))
    rows = [{"file": f"{mid}.pth", "architecture": "cnn_digits", "test_acc": 0.5 + i / 10, "seed": i}
            for i, mid in enumerate(states)]
    rows += [{"file": "corrupt.pt", "architecture": "cnn_digits", "test_acc": 0.1, "seed": 9},
             {"file": None, "architecture": "cnn_digits", "test_acc": 0.1, "seed": 9},
             {"file": "gone.pt", "architecture": "cnn_digits", "test_acc": 0.1, "seed": 9},
             {"file": "mlp.safetensors", "architecture": "mlp_wide", "test_acc": 0.1, "seed": 9}]
    zb.write_sidecar(root, rows)
    zoo = open_zoo(root, verify=True)
    assert [(m.model_id, m.epochs, m.hparams) for m in zoo.models] == [(mid, [0], {"seed": i})
                                                                      for i, mid in enumerate(states)]
    assert [m.last.metrics["test_acc"] for m in zoo.models] == [0.5, 0.6, 0.7]
    reasons = {s.path.removeprefix(root + "/"): s.reason for s in zoo.skipped}
    assert set(reasons) == {"metrics.csv row 5", "gone.pt", "stray.pt", f"{root} (model mlp)", "corrupt.pt",
                            f"{root} (model corrupt)"}
    assert reasons["metrics.csv row 5"] == "no file name"
    assert reasons["gone.pt"] == "listed in metrics.csv (row 6) but no such state-dict file at the zoo root"
    assert reasons["stray.pt"] == "not listed in the sidecar metrics.csv"
    assert reasons[f"{root} (model mlp)"] == f"unknown architecture 'mlp_wide'; registered: {', '.join(sorted(ARCHITECTURES))}"
    assert reasons["corrupt.pt"].startswith("torch.load failed")
    assert reasons[f"{root} (model corrupt)"] == "no usable checkpoints"
    assert all(torch.equal(t, states[m.model_id][k]) for m in zoo.models for k, t in load_checkpoint(m, m.last).items())


def test_flat_sidecar_errors(tmp_path):
    root = str(tmp_path / "zoo")
    zb.put(root, "a.pt", zb.torch_bytes(zb.trajectory("cnn_digits", epochs=0)[0]))
    zb.write_sidecar(root, [{"name": "a.pt", "test_acc": 0.5}])
    with pytest.raises(ZooError, match=r"metrics.csv lacks required column\(s\): file, architecture \(architecture "
                                       r"may instead be given once in zoo.json\); it has: name, test_acc"):
        open_zoo(root)
    zb.put(root, "zoo.json", json.dumps({"architecture": "cnn_digits"}).encode())
    with pytest.raises(ZooError, match=r"metrics.csv lacks required column\(s\): file; it has"):
        open_zoo(root)
    zb.write_sidecar(root, [{"file": "a.pt"}], name="metrics.parquet")
    with pytest.raises(ZooError, match="one sidecar, found both metrics.csv and metrics.parquet"):
        open_zoo(root)
    zb.remove(root, "metrics.csv")
    assert [m.model_id for m in open_zoo(root, verify=True).models] == ["a"]  # the file's stem, epoch 0


def test_which_layout_and_why_not(tmp_path):
    root = str(tmp_path / "zoo")
    zb.put(root, "a.pt", zb.torch_bytes(zb.trajectory("cnn_digits", epochs=0)[0]))
    with pytest.raises(ZooError, match="holds state-dict files but no sidecar"):
        open_zoo(root)
    zb.build_hf_zoo(root, n_models=1, epochs=0)  # hf model dirs beside a.pt, still no sidecar: hf
    assert open_zoo(root).format == "hf"
    zb.write_sidecar(root, [{"file": "a.pt", "architecture": "cnn_digits"}])  # a sidecar: flat before hf
    assert open_zoo(root).format == "flat"
    zb.build_native_zoo(root, n_models=1, epochs=0)  # a manifest before everything
    assert open_zoo(root).format == "native"
    other = str(tmp_path / "other")
    zb.put(other, "notes.txt", b"hello")
    with pytest.raises(ZooError, match=r"native \(manifest.parquet\), flat \(.*metrics.csv or metrics.parquet sidecar\), "
                                       r"public \(model directories containing params.json\) or hf \(model directories "
                                       r"containing config.json and model.safetensors or pytorch_model.bin\)"):
        open_zoo(other)


def test_zoo_info_shows_the_new_layouts(tmp_path, capsys):
    hf, flat = str(tmp_path / "hf"), str(tmp_path / "flat")
    zb.build_hf_zoo(hf, n_models=2, epochs=1)
    zb.build_flat_zoo(flat, n_models=2, epochs=1)
    zb.put(flat, "extra.pt", b"junk")
    assert main(["zoo", "info", hf]) == 0
    text = capsys.readouterr().out
    assert f"zoo:          {hf} (hf layout)" in text and "checkpoints:  4 (2 per model)" in text
    assert "architectures: cnn_digits x2" in text and "median 0.3050" in text and "skipped:      0" in text
    assert main(["zoo", "info", flat, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["models"], info["checkpoints"]) == ("flat", 2, 4)
    assert info["skipped"] == [{"path": f"{flat}/extra.pt", "reason": "not listed in the sidecar metrics.csv"}]


@pytest.mark.parametrize("layout", ["hf", "flat"])
def test_make_zoo_refuses_to_write_over_an_hf_or_flat_zoo(layout, tmp_path):
    """A native writer removes what its manifest does not name: it must not take these zoos for no zoo."""
    root = str(tmp_path / "zoo")
    (zb.build_hf_zoo if layout == "hf" else zb.build_flat_zoo)(root, n_models=1, epochs=0)
    before = storage.find(root)
    with pytest.raises(ZooExistsError, match=f"already published at {root} \\({layout} layout\\)"):
        generate_zoo(ZooGenConfig(out=root, models=1, epochs=1), progress=False)
    assert storage.find(root) == before


# ---------------------------------------------------------------- end to end: pretrain and probe through the CLI

PRETRAIN = ["--preset", "tiny", "--workers", "1", "--epochs", "1", "--batch-size", "4", "--train.num_threads", "1"]


@pytest.fixture(scope="module")
def hf_run(ray_cluster, s3_server, tmp_path_factory):
    """One tiny run pretrained on an hf-layout zoo on S3 (10 models x 3 checkpoints), and a flat copy of that
    zoo (same ids, weights and metrics) on local disk."""
    import boto3

    tmp = tmp_path_factory.mktemp("hub-e2e")
    bucket = "hub-e2e"
    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=bucket)
    hf, flat, runs = f"s3://{bucket}/hf", str(tmp / "flat"), str(tmp / "runs")
    zb.build_hf_zoo(hf, n_models=10, epochs=2)
    zb.build_flat_zoo(flat, n_models=10, epochs=2)
    assert main(["pretrain", "--zoo", hf, "--out", runs, "--name", "h", *PRETRAIN]) == 0
    return hf, flat, f"{runs}/h", tmp


def test_pretrain_and_probe_on_hf_and_flat_zoos(hf_run):
    """The run pretrained on the hf zoo probes it and its flat copy with its own split, to the same tables."""
    hf, flat, run, tmp = hf_run
    canonical = json.loads(storage.read_bytes(storage.join(run, "canonical.json")))
    assert canonical["zoo_uri"] == hf and sum(map(len, canonical["splits"].values())) == 10
    results = {}
    for layout, zoo in (("hf", hf), ("flat", flat)):
        out = str(tmp / f"probe-{layout}")
        assert main(["probe", "--run", run, "--zoo", zoo, "--out", out, "--folds", "0", "--control", "false"]) == 0
        res = json.loads(storage.read_bytes(storage.join(out, "results.json")))
        assert (res["format"], res["split"], res["test_models_pretrained"]) == (layout, "the run's own split", 0)
        assert res["counts"]["test"] == {"models": 2, "checkpoints": 6}  # 10 models: 6/2/2, epochs 0..2
        assert set(res["test_models"]) == set(canonical["splits"]["test"])
        assert list(res["hyperparameters"]) == ["activation (accuracy)"]  # relu/tanh; seed is an id, the rest constant
        results[layout] = res, storage.read_bytes(storage.join(out, "results.csv"))
    assert results["hf"][1] == results["flat"][1]
    assert results["hf"][0]["hyperparameters"] == results["flat"][0]["hyperparameters"]
    assert results["hf"][0]["test_r2"]["Epoch"]["s(W)"] > 0.5  # the weights drift with the epoch: s(W) sees it


def test_the_canonical_build_reads_the_flat_copy_as_the_hf_zoo(hf_run):
    """The run's canonical zoo (built from the hf zoo on S3) and one built from the flat copy: the same shards."""
    import dataclasses
    import io

    import pyarrow.parquet as pq

    from sane_ray.data import prepare_data
    from sane_ray.data.format import CanonicalZoo
    from sane_ray.pretrain_config import preset_config

    hf, flat, run, tmp = hf_run
    ours = CanonicalZoo.from_json(storage.read_bytes(storage.join(run, "canonical.json")).decode())
    cfg = dataclasses.replace(preset_config("tiny").data, zoo_uri=flat, cache_uri=str(tmp / "flat-cache"))
    theirs = prepare_data(cfg).canonical
    assert (theirs.zoo_uri, theirs.splits, theirs.checkpoints, theirs.skipped) == (flat, ours.splits, ours.checkpoints, [])
    for split, files in ours.files.items():
        assert files == theirs.files[split]
        for rel in files:
            a, b = (pq.read_table(io.BytesIO(storage.read_bytes(storage.join(c.uri, rel)))).to_pandas()
                    for c in (ours, theirs))
            assert len(a) == 3 and a.equals(b)  # pandas: NaN metrics (val_loss) equal where both are NaN
