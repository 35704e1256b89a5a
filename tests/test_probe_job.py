"""The probe job end to end: a tiny zoo, a tiny pretraining run (with the probe signal), then `sane-ray probe`."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

import zoo_builders as zb
from sane_ray import storage
from sane_ray.cli import main
from sane_ray.probe.job import (CHANCE, CONTROL, CONTROL_LAYER, FULL, LAYER_MEAN, LAYER_MEAN_STD, MEAN_STD, SANE,
                                SELECTED, TEST_MAJORITY, VARIANTS, ProbeData, hyperparameter_targets)
from sane_ray.zoo import native

PRETRAIN = ["--preset", "tiny", "--workers", "1", "--epochs", "1", "--batch-size", "4",
            "--train.num_threads", "1", "--train.optim.lr", "1e-3", "--train.probe_every", "1"]


def _table(uri: str) -> dict[str, dict[str, float]]:
    reader = csv.DictReader(io.StringIO(storage.read_bytes(uri).decode()))
    corner = reader.fieldnames[0]  # "target", or "architecture" in architectures.csv
    return {r[corner]: {k: float(v) for k, v in r.items() if k != corner} for r in reader}


def _public_zoo(root: str, n_models: int, epochs: int) -> None:
    """A public-layout zoo whose models differ in activation (a hyperparameter to probe)."""
    for i in range(n_models):
        nlin = ("tanh", "relu")[i % 2]
        states = zb.trajectory("cnn_mnist_public", {"activation": nlin}, seed=i, epochs=epochs)
        zb.write_public_model(root, zb.public_model_name(i), zb.public_params(i, nlin=nlin, epochs=epochs),
                              zb.result_lines(i, epochs), states)


@pytest.fixture(scope="module")
def public_run(ray_cluster, tmp_path_factory):
    """One tiny run (the expensive part), pretrained on a public-layout zoo with the probe signal on."""
    tmp = tmp_path_factory.mktemp("probe")
    zoo, runs = str(tmp / "public"), str(tmp / "runs")
    _public_zoo(zoo, n_models=10, epochs=3)
    assert main(["pretrain", "--zoo", zoo, "--out", runs, "--name", "p", *PRETRAIN]) == 0
    return zoo, f"{runs}/p", tmp


def _check_outputs(out: str, methods: list[str]) -> dict[str, dict[str, float]]:
    names = set(storage.listdir(out))
    assert {"results.csv", "results.md", "results_kfold.csv", "results.json", "pred_vs_true.png",
            "layer_spread.png", "probe_config.yaml"} <= names
    table = _table(storage.join(out, "results.csv"))
    assert list(table) == ["Acc", "Epoch", "Ggap"]
    for row in table.values():
        assert list(row) == methods
        assert all(np.isfinite(v) and v <= 1.0 for v in row.values())
    kfold = _table(storage.join(out, "results_kfold.csv"))
    assert set(kfold["Acc"]) == {x for m in methods for x in (m, f"{m}_std")}
    md = storage.read_bytes(storage.join(out, "results.md")).decode()
    assert "| R² | " + " | ".join(methods) + " |" in md
    for name in ("pred_vs_true.png", "layer_spread.png"):
        assert storage.read_bytes(storage.join(out, name))[:8] == b"\x89PNG\r\n\x1a\n"
    return table


def test_probe_job_on_the_public_layout_with_its_own_run(public_run, capsys):
    zoo, run, tmp = public_run
    # The probe signal reached the run's metrics and summary.
    assert "val_probe_r2" in storage.read_bytes(storage.join(run, "summary.md")).decode()
    out = str(tmp / "probe-public")
    # Public zoos have no metrics for epoch 0 (the initialization): those rows drop out of the Acc probe.
    assert main(["probe", "--run", run, "--out", out, "--folds", "3", "--max_flat_features", "1000"]) == 0
    assert f"{out}/results.md" in capsys.readouterr().out
    # 2,464 weights > 1000: W (and the full sequence) skipped
    _check_outputs(out, ["s(W)", SANE, MEAN_STD, LAYER_MEAN, LAYER_MEAN_STD, CONTROL, CONTROL_LAYER, SELECTED])
    md = storage.read_bytes(storage.join(out, "results.md")).decode()
    assert "W skipped: 2,464 weights per model > max_flat_features 1,000" in md
    hp = _table(storage.join(out, "hyperparameters.csv"))
    assert list(hp) == ["model::nlin (accuracy)"]
    assert hp["model::nlin (accuracy)"][CHANCE] == pytest.approx(0.5)
    assert hp["model::nlin (accuracy)"][TEST_MAJORITY] == pytest.approx(0.5)
    res = json.loads(storage.read_bytes(storage.join(out, "results.json")))
    # The SANE column that counts is chosen on validation: the variant with the best validation R².
    for row in ("Acc", "Epoch", "Ggap"):
        pick = res["selected"][row]
        assert pick in VARIANTS and res["val_r2"][row][pick] == max(res["val_r2"][row][m] for m in VARIANTS
                                                                    if m in res["val_r2"][row])
        assert res["test_r2"][row][SELECTED] == res["test_r2"][row][pick]
        assert len(res["kfold_selected"][row]) == 3
    assert res["split"] == "the run's own split"
    assert res["counts"]["test"] == {"models": 2, "checkpoints": 8}  # 10 models: 6/2/2, epochs 0..3
    # The run's probe test models were never in its pretraining split.
    canonical = json.loads(storage.read_bytes(storage.join(run, "canonical.json")))
    assert set(canonical["splits"]["test"]) == set(res["test_models"])
    assert not set(canonical["splits"]["test"]) & set(canonical["splits"]["train"])


def test_probe_job_on_a_native_zoo_the_run_never_saw(public_run):
    _, run, tmp = public_run
    zoo = str(tmp / "native")
    zb.build_native_zoo(zoo, n_models=12, epochs=3)
    out = str(tmp / "probe-native")
    assert main(["probe", "--run", run, "--zoo", zoo, "--out", out, "--folds", "3"]) == 0
    table = _check_outputs(out, ["W", "s(W)", SANE, MEAN_STD, LAYER_MEAN, LAYER_MEAN_STD, FULL, CONTROL,
                                 CONTROL_LAYER, SELECTED])
    # The fake zoo's accuracy rises with the epoch and the weights drift with it: s(W) sees that.
    assert table["Epoch"]["s(W)"] > 0.5
    res = json.loads(storage.read_bytes(storage.join(out, "results.json")))
    # None of these models is the run's: split afresh with the run's fractions and split seed.
    assert res["split"].startswith("a fresh split by model (0.7/0.15/0.15, the run's split seed 42)")
    assert res["test_models_pretrained"] == 0


def _models_csv(out: str) -> dict[str, dict[str, str]]:
    return {r["model_id"]: r for r in csv.DictReader(io.StringIO(storage.read_bytes(storage.join(out, "models.csv")).decode()))}


def test_probe_never_tests_a_model_the_run_trained_on(ray_cluster, tmp_path):
    """The run's split owns the models it covers: a superset zoo's extra models and a model the
    pretraining dropped (no usable checkpoint) join only the test side, never reshuffle the rest."""
    zoo, bigger, runs = str(tmp_path / "zoo"), str(tmp_path / "bigger"), str(tmp_path / "runs")
    zb.build_native_zoo(zoo, n_models=10, epochs=2)
    for epoch in range(3):  # every checkpoint of m009 truncated: pretraining drops the model
        path = tmp_path / "zoo" / native.checkpoint_path("m009", epoch)
        path.write_bytes(path.read_bytes()[:100])
    zb.build_native_zoo(bigger, n_models=14, epochs=2)  # m000..m009 as above (same seeds), m010..m013 new
    assert main(["pretrain", "--zoo", zoo, "--out", runs, "--name", "d", *PRETRAIN]) == 0
    run = f"{runs}/d"
    splits = json.loads(storage.read_bytes(storage.join(run, "canonical.json")))["splits"]
    run_split = {m: s for s, ids in splits.items() for m in ids}
    assert "m009" not in run_split and len(run_split) == 9
    for name, uri, unseen in (("own", zoo, set()), ("superset", bigger, {"m009", "m010", "m011", "m012", "m013"})):
        out = str(tmp_path / f"probe-{name}")
        assert main(["probe", "--run", run, "--zoo", uri, "--out", out, "--folds", "0", "--control", "false"]) == 0
        models = _models_csv(out)
        assert set(models) == set(run_split) | unseen  # own zoo: m009 has no usable checkpoint, so it is left out
        for mid, r in models.items():
            assert r["pretrained"] == str(run_split.get(mid) == "train").lower(), r
            assert r["split"] == (run_split.get(mid) or "test"), r  # the run's split, or test for unseen models
            assert r["run_split"] == run_split.get(mid, "")
        res = json.loads(storage.read_bytes(storage.join(out, "results.json")))
        assert res["test_models_pretrained"] == 0
        md = storage.read_bytes(storage.join(out, "results.md")).decode()
        assert "Test models seen in pretraining: **0** of" in md
        if unseen:
            assert res["split"] == "the run's own split; 5 model(s) the run never split joined the test split"
        else:
            assert res["split"] == "the run's own split" and "m009: left out" in md
    # Another zoo under the same model ids (other seeds): none of its models is the run's, so none is
    # marked pretrained and the zoo is split afresh.
    other = str(tmp_path / "other")
    zb.build_native_zoo(other, n_models=10, epochs=2, seed_offset=100)
    out = str(tmp_path / "probe-other")
    assert main(["probe", "--run", run, "--zoo", other, "--out", out, "--folds", "0", "--control", "false"]) == 0
    models = _models_csv(out)
    assert len(models) == 10 and all(r["pretrained"] == "false" and r["run_split"] == "" for r in models.values())
    res = json.loads(storage.read_bytes(storage.join(out, "results.json")))
    assert res["split"].startswith("a fresh split by model") and res["split"].endswith(
        "(9 share an id with one of the run's models but none of its checkpoints)")


# make-zoo's hyperparameter names -> the public layout's (sane_ray.zoo.public)
PUBLIC_NAMES = {"lr": "optim::lr", "weight_decay": "optim::wd", "init": "model::init_type",
                "activation": "model::nlin", "dropout": "model::dropout"}


def test_probe_job_on_a_public_copy_of_the_runs_zoo(ray_cluster, tmp_path):
    """A run pretrained on a make-zoo zoo probes that zoo's public-layout copy with its own split, to the same table."""
    zoo = ["--models", "10", "--epochs", "2", "--seed", "5"]
    native, public, runs = str(tmp_path / "native"), str(tmp_path / "public"), str(tmp_path / "runs")
    assert main(["make-zoo", "--out", native, *zoo]) == 0
    assert main(["make-zoo", "--out", public, "--format", "public", *zoo]) == 0
    assert main(["pretrain", "--zoo", native, "--out", runs, "--name", "n", *PRETRAIN]) == 0
    results = {}
    for name, uri in (("native", native), ("public", public)):
        out = str(tmp_path / f"probe-{name}")
        assert main(["probe", "--run", f"{runs}/n", "--zoo", uri, "--out", out, "--folds", "3"]) == 0
        results[name] = json.loads(storage.read_bytes(storage.join(out, "results.json")))
        assert results[name]["split"] == "the run's own split"
        for f in ("results.csv", "results_kfold.csv"):
            results[name][f] = storage.read_bytes(storage.join(out, f))
    a, b = results["native"], results["public"]
    assert (a["format"], b["format"]) == ("native", "public")
    assert a["results.csv"] == b["results.csv"] and a["results_kfold.csv"] == b["results_kfold.csv"]
    assert a["counts"] == b["counts"] and a["test_models"] == b["test_models"]
    # The same hyperparameter probes, under the public layout's names.
    renamed = {}
    for row, scores in a["hyperparameters"].items():
        name, kind = row.split(" (")
        renamed[f"{PUBLIC_NAMES.get(name, name)} ({kind}"] = scores
    assert renamed and b["hyperparameters"] == renamed


def test_probe_refuses_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["probe", "--run", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_hyperparameter_targets_pick_varying_training_settings():
    data = ProbeData()
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-4, 5e-4, 2e-3, 5e-3, 7e-3, 8e-4]
    for i, lr in enumerate(lrs):
        data.hparams.append({"seed": i, "lr": lr, "optimizer": "adam", "init": ("a", "b")[i % 2],
                             "arch:activation": ("relu", "tanh", "gelu")[i % 3], "model::nlin": ("relu", "tanh", "gelu")[i % 3]})
    targets = hyperparameter_targets(data)
    # seed: an identifier; optimizer: constant; the architecture's activation: a repeat of model::nlin
    assert sorted(targets) == ["init", "log10 lr", "model::nlin"]
    y, categorical = targets["log10 lr"]
    assert not categorical and y[0] == pytest.approx(-4)
    assert targets["init"][1]


def test_one_run_over_mixed_architectures_pretrains_balanced_and_probes_per_architecture(ray_cluster, tmp_path,
                                                                                         caplog):
    """A zoo of two architectures: windows balanced between them, per-token loss, a pooled SANE table,
    one full table per architecture and the embedding map."""
    zoo, runs, out = str(tmp_path / "zoo"), str(tmp_path / "runs"), str(tmp_path / "probe")
    zb.build_native_zoo(zoo, n_models=12, epochs=2, archs=("cnn_digits", "mlp_digits"))
    with caplog.at_level("INFO", logger="sane_ray.data.pipeline"):
        assert main(["pretrain", "--zoo", zoo, "--out", runs, "--name", "mixed", *PRETRAIN,
                     "--train.model.reconstruction_norm", "token"]) == 0
    shares = [r.getMessage() for r in caplog.records if "windows per training pass by architecture" in r.getMessage()]
    assert shares and "cnn_digits 5" in shares[0] and "mlp_digits 5" in shares[0], shares  # about 50% each
    assert main(["probe", "--run", f"{runs}/mixed", "--out", out, "--folds", "0"]) == 0
    pooled = _table(storage.join(out, "results.csv"))
    assert set(pooled["Acc"]) >= {SANE, CONTROL} and not {"W", "s(W)"} & set(pooled["Acc"])
    by_arch = _table(storage.join(out, "architectures.csv"))
    assert set(by_arch) == {"cnn_digits", "mlp_digits"}
    for arch, row in by_arch.items():
        assert np.isfinite(row["SANE"]) and np.isfinite(row["W"]) and np.isfinite(row["SANE, pooled probe"]), row
        own = _table(storage.join(out, "arch", arch, "results.csv"))
        assert own["Acc"]["W"] == row["W"] and {"W", "s(W)", SANE} <= set(own["Acc"])
        models = _models_csv(storage.join(out, "arch", arch))
        assert all(int(m[1:]) % 2 == (arch == "mlp_digits") for m in models)  # only that architecture's models
    md = storage.read_bytes(storage.join(out, "results.md")).decode()
    assert md.startswith("# Property prediction across architectures") and "# Pooled probe" in md
    assert storage.read_bytes(storage.join(out, "embedding_map.png"))[:8] == b"\x89PNG\r\n\x1a\n"
