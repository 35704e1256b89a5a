"""`make-zoo --format public`: the native zoo's models in the public layout, published by one rename."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from sane_ray.cli import main
from sane_ray.lease import LEASE_FILE
from sane_ray.zoo import generate
from sane_ray.zoo.checks import ZooError
from sane_ray.zoo.generate import ZooExistsError, ZooGenerationError, ensure_zoo, generate_zoo
from sane_ray.zoo.plan import SearchSpace, ZooGenConfig, plan_models
from sane_ray.zoo.public import ZOO_MARKER
from sane_ray.zoo.reader import load_checkpoint, open_zoo

SPACE = SearchSpace(lr=[3e-3, 1e-2], activation=["tanh", "gelu", "silu"], dropout=[0.0, 0.1])
TINY = {"models": 3, "epochs": 2, "seed": 7, "space": SPACE}


def _files(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def _siblings(root: str) -> list[str]:
    parent, name = os.path.split(root)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


@pytest.fixture(scope="module")
def zoos(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("writer")
    native = generate_zoo(ZooGenConfig(out=str(tmp / "native"), **TINY), progress=False)
    pub = generate_zoo(ZooGenConfig(out=str(tmp / "public"), format="public", **TINY), progress=False)
    return native, pub, tmp


def test_public_zoo_holds_the_native_zoos_models(zoos):
    native_uri, public_uri, _ = zoos
    native, pub = open_zoo(native_uri, verify=True), open_zoo(public_uri, verify=True)
    assert (native.format, pub.format) == ("native", "public") and not native.skipped and not pub.skipped
    assert pub.metadata == native.metadata == {"generation": ZooGenConfig(**TINY).identity()}
    assert [m.model_id for m in pub.models] == [m.model_id for m in native.models] == [
        p.model_id for p in plan_models(ZooGenConfig(**TINY))]
    for n, p in zip(native.models, pub.models, strict=True):
        assert (p.architecture, p.arch_kwargs) == (n.architecture, n.arch_kwargs)
        assert p.epochs == n.epochs == [0, 1, 2]
        h = p.hparams
        assert (h["optim::lr"], h["optim::wd"], h["model::init_type"], h["seed"], h["training::epochs_train"]) == (
            n.hparams["lr"], n.hparams["weight_decay"], n.hparams["init"], n.hparams["seed"], n.hparams["epochs"])
        for cn, cp in zip(n.checkpoints, p.checkpoints, strict=True):
            assert cp.metrics == cn.metrics and not any(math.isnan(v) for v in cp.metrics.values())
            a, b = load_checkpoint(n, cn), load_checkpoint(p, cp)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Only the models and the marker: no lease left, nothing beside the root.
    assert sorted(os.listdir(public_uri)) == ["model_0000", "model_0001", "model_0002", ZOO_MARKER]
    assert sorted(os.listdir(os.path.join(public_uri, "model_0000"))) == [
        "checkpoint_000000", "checkpoint_000001", "checkpoint_000002", "params.json", "result.json"]
    assert _siblings(public_uri) == []


def test_public_zoo_bytes_are_deterministic(zoos):
    _, public_uri, tmp = zoos
    again = generate_zoo(ZooGenConfig(out=str(tmp / "again"), format="public", **TINY), progress=False)
    assert _files(again) == _files(public_uri)


def test_zoo_info_on_a_public_zoo(zoos, capsys):
    _, public_uri, _ = zoos
    assert main(["zoo", "info", public_uri]) == 0
    out = capsys.readouterr().out
    assert f"{public_uri} (public layout)" in out and "cnn_digits x3" in out and "9 (3 per model)" in out
    assert main(["zoo", "info", public_uri, "--json", "--no-verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["generation"]["models"] == 3 and info["skipped"] == []


def test_reuse_and_refusal_follow_the_layout(zoos):
    native_uri, public_uri, _ = zoos
    assert ensure_zoo(ZooGenConfig(out=public_uri, format="public", **TINY), progress=False) == public_uri
    with pytest.raises(ZooExistsError, match=r"differs in: format\)"):
        ensure_zoo(ZooGenConfig(out=native_uri, format="public", **TINY), progress=False)
    with pytest.raises(ZooExistsError, match=r"public layout.*overwrite=true"):
        generate_zoo(ZooGenConfig(out=public_uri, **TINY), progress=False)


def test_failed_generation_leaves_no_zoo_and_an_overwrite_keeps_the_old(ray_cluster, tmp_path, monkeypatch):
    out = str(tmp_path / "zoo")
    old_cfg = ZooGenConfig(out=out, format="public", models=2, epochs=1, seed=3, space=SPACE)
    real_plans = generate.plan_models

    def broken(cfg):  # model_0001 fails in its Ray task, after model_0000 may have been written
        plans = real_plans(cfg)
        plans[1] = dataclasses.replace(plans[1], arch_kwargs={**plans[1].arch_kwargs, "activation": "nope"})
        return plans

    with monkeypatch.context() as m:
        m.setattr(generate, "plan_models", broken)
        with pytest.raises(ZooGenerationError, match=f"training model_0001 failed.*nothing published at {out}"):
            generate_zoo(old_cfg, progress=False)
    with pytest.raises(ZooError, match="empty"):
        open_zoo(out)
    assert _siblings(out) == []

    generate_zoo(old_cfg, progress=False)
    before = _files(out)
    new_cfg = dataclasses.replace(old_cfg, models=1, seed=4, overwrite=True)
    with monkeypatch.context() as m:
        m.setattr(generate, "plan_models", lambda cfg: broken(dataclasses.replace(cfg, models=2)))
        with pytest.raises(ZooGenerationError):
            generate_zoo(new_cfg, progress=False)
    assert _files(out) == before and _siblings(out) == []

    os.makedirs(os.path.join(str(tmp_path), ".zoo.sane-ray-staging", "model_0009"))  # what a crashed writer left
    generate_zoo(new_cfg, progress=False)
    zoo = open_zoo(out, verify=True)
    assert zoo.metadata["generation"] == new_cfg.identity() and [m.model_id for m in zoo.models] == ["model_0000"]
    assert sorted(os.listdir(out)) == ["model_0000", ZOO_MARKER] and _siblings(out) == []


def test_native_overwrite_of_a_public_zoo_removes_its_models(ray_cluster, tmp_path):
    out = str(tmp_path / "zoo")
    cfg = ZooGenConfig(out=out, format="public", models=2, epochs=1, seed=3, space=SPACE)
    generate_zoo(cfg, progress=False)
    generate_zoo(dataclasses.replace(cfg, format="native", overwrite=True), progress=False)
    zoo = open_zoo(out, verify=True)
    assert zoo.format == "native" and len(zoo.models) == 2
    assert sorted(os.listdir(out)) == ["manifest.parquet", "models"] and LEASE_FILE not in os.listdir(out)


def test_public_layout_refuses_s3_and_foreign_files(tmp_path, capsys):
    assert main(["make-zoo", "--format", "public", "--out", "s3://bucket/zoo", "--models", "1"]) == 2
    err = capsys.readouterr().err
    assert "format public cannot be written to S3" in err and "no rename" in err
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["make-zoo", "--format", "public", "--out", str(out), "--models", "1"]) == 2
    assert "holds files that are not a published zoo (notes.txt)" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"]
