"""Native zoos (safetensors + manifest.parquet), locally and on S3: round trip, listing
without opening checkpoints, damaged checkpoints and manifests."""

from __future__ import annotations

import io
import json
import math

import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zoo_builders as zb

from sane_ray import storage
from sane_ray.zoo import native
from sane_ray.zoo.checks import BadCheckpointError, ZooError
from sane_ray.zoo.info import format_info, zoo_info
from sane_ray.zoo.reader import load_checkpoint, load_model_checkpoints, open_zoo


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    return zb.root_uri(request.param, tmp_path, s3)


def test_round_trip_is_bit_identical(root):
    states = zb.build_native_zoo(root, n_models=3, epochs=2, archs=("cnn_digits", "cnn_digits_bn"),
                                 metadata={"dataset": "digits"})
    zoo = open_zoo(root)
    assert (zoo.format, zoo.uri, zoo.skipped) == ("native", root, [])
    assert zoo.metadata == {"dataset": "digits"}
    assert [m.model_id for m in zoo.models] == ["m000", "m001", "m002"]
    assert [m.architecture for m in zoo.models] == ["cnn_digits", "cnn_digits_bn", "cnn_digits"]
    for i, model in enumerate(zoo.models):
        assert model.epochs == [0, 1, 2]
        assert model.hparams == {"seed": i, "lr": 1e-3}
        for ckpt in model.checkpoints:
            assert ckpt.uri == storage.join(root, native.checkpoint_path(model.model_id, ckpt.epoch))
            assert len(ckpt.sha256) == 64
            want = zb.fake_metrics(i, ckpt.epoch)
            assert ckpt.metrics["test_acc"] == want["test_acc"]
            assert ckpt.metrics["ggap"] == pytest.approx(want["train_acc"] - want["test_acc"])
            assert math.isnan(ckpt.metrics["val_loss"])
            loaded = load_checkpoint(model, ckpt)
            expected = states[model.model_id][ckpt.epoch]
            assert loaded.keys() == expected.keys()
            for k, t in loaded.items():
                assert t.dtype == (torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
                assert torch.equal(t, expected[k]), k
    assert zoo_info(zoo)["architectures"] == {"cnn_digits": 2, "cnn_digits_bn": 1}


def test_listing_opens_only_the_manifest(tmp_path, monkeypatch):
    root = str(tmp_path / "zoo")
    zb.build_native_zoo(root, n_models=2, epochs=3)
    opened: list[str] = []
    real_open = fsspec.implementations.local.LocalFileSystem._open
    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "_open",
                        lambda self, path, *a, **kw: opened.append(path) or real_open(self, path, *a, **kw))
    zoo = open_zoo(root)
    assert zoo.num_checkpoints == 8
    assert [p.rsplit("/", 1)[-1] for p in opened] == ["manifest.parquet"]
    load_checkpoint(zoo.models[0], zoo.models[0].checkpoints[1])
    assert opened[-1].endswith("m000/epoch_0001.safetensors")


def test_truncated_and_deleted_checkpoints(root, caplog):
    zb.build_native_zoo(root, n_models=3, epochs=2)
    truncated = storage.join(root, native.checkpoint_path("m001", 1))
    storage.write_bytes_atomic(truncated, storage.read_bytes(truncated)[:-100])
    zb.remove(root, native.checkpoint_path("m002", 2))
    deleted = storage.join(root, native.checkpoint_path("m002", 2))

    listed = open_zoo(root)  # listing trusts the manifest
    assert listed.num_checkpoints == 9 and listed.skipped == []
    with pytest.raises(BadCheckpointError, match="SHA-256 mismatch") as err:
        load_checkpoint(listed.models[1], listed.models[1].checkpoints[1])
    assert err.value.path == truncated
    good, bad = load_model_checkpoints(listed.model("m002"))
    assert [c.epoch for c, _ in good] == [0, 1]
    assert [s.path for s in bad] == [deleted] and "cannot read" in bad[0].reason

    with caplog.at_level("WARNING", logger="sane_ray.zoo"):
        zoo = open_zoo(root, verify=True)
    assert {s.path: s.reason.split(" (")[0] for s in zoo.skipped} == {
        truncated: "SHA-256 mismatch", deleted: "cannot read the file"}
    assert [m.epochs for m in zoo.models] == [[0, 1, 2], [0, 2], [0, 1]]
    assert truncated in caplog.text and deleted in caplog.text
    info = zoo_info(zoo)
    assert (info["models"], info["checkpoints"], len(info["skipped"])) == (3, 7, 2)
    assert truncated in format_info(info)


def test_model_without_good_checkpoints_is_dropped(tmp_path):
    root = str(tmp_path / "zoo")
    zb.build_native_zoo(root, n_models=2, epochs=1)
    for epoch in (0, 1):
        storage.write_bytes_atomic(storage.join(root, native.checkpoint_path("m001", epoch)), b"garbage")
    zoo = open_zoo(root, verify=True)
    assert [m.model_id for m in zoo.models] == ["m000"]
    assert [s.path.rsplit("/", 2)[-2:] for s in zoo.skipped] == [
        ["m001", "epoch_0000.safetensors"], ["m001", "epoch_0001.safetensors"], ["models", "m001"]]
    assert zoo.skipped[-1].reason == "no usable checkpoints"


def test_unpublished_zoo_is_not_a_zoo(root):
    native.write_checkpoint(root, "m000", 0, zb.trajectory("cnn_digits", epochs=0)[0], {}, "cnn_digits")
    with pytest.raises(ZooError, match="models/ but no manifest.parquet") as err:
        open_zoo(root)
    assert root in str(err.value)


def _rewrite_manifest(root: str, edit) -> None:
    uri = storage.join(root, native.MANIFEST)
    table = edit(pq.read_table(io.BytesIO(storage.read_bytes(uri))))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def _with_meta(table: pa.Table, **changes: str) -> pa.Table:
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    return table.replace_schema_metadata({**meta, **changes})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.drop_columns(["sha256", "epoch"]), "lacks manifest columns: epoch, sha256"),
    (lambda t: _with_meta(t, **{"sane_ray.version": "99"}), "format version '99'"),
    (lambda t: t.replace_schema_metadata({}), "not a sane-ray native manifest"),
])
def test_bad_manifest(tmp_path, edit, message):
    root = str(tmp_path / "zoo")
    zb.build_native_zoo(root, n_models=1, epochs=0)
    _rewrite_manifest(root, edit)
    with pytest.raises(ZooError, match=message) as err:
        open_zoo(root)
    assert storage.join(root, native.MANIFEST) in str(err.value)


def test_corrupt_manifest_bytes(root):
    zb.build_native_zoo(root, n_models=1, epochs=0)
    zb.put(root, native.MANIFEST, b"PAR1 this is not parquet")
    with pytest.raises(ZooError, match="not a readable Parquet manifest") as err:
        open_zoo(root)
    assert storage.join(root, native.MANIFEST) in str(err.value)


def test_unknown_architecture_in_manifest_skips_the_model(tmp_path):
    root = str(tmp_path / "zoo")
    zb.build_native_zoo(root, n_models=2, epochs=1)

    def rename_arch(t: pa.Table) -> pa.Table:
        archs = ["vgg99" if m == "m001" else a
                 for m, a in zip(t.column("model_id").to_pylist(), t.column("architecture").to_pylist())]
        return t.set_column(t.schema.get_field_index("architecture"), "architecture", pa.array(archs))

    _rewrite_manifest(root, rename_arch)
    zoo = open_zoo(root)
    assert [m.model_id for m in zoo.models] == ["m000"]
    assert zoo.skipped[0].path == storage.join(root, "models", "m001")
    assert "unknown architecture 'vgg99'" in zoo.skipped[0].reason


def test_metadata_and_hparams_survive(tmp_path):
    root = str(tmp_path / "zoo")
    row = native.write_checkpoint(root, "a", 0, zb.trajectory("mlp_digits", {"hidden": [8]}, epochs=0)[0], {"test_acc": 0.5},
                                  "mlp_digits", {"hidden": [8]}, {"optim": {"lr": 0.1}})
    native.publish_manifest(root, [row], {"seeds": [1, 2]})
    zoo = open_zoo(root, verify=True)
    (model,) = zoo.models
    assert (model.arch_kwargs, model.hparams, zoo.metadata) == ({"hidden": [8]}, {"optim": {"lr": 0.1}},
                                                                {"seeds": [1, 2]})
    assert load_checkpoint(model, model.last)["module_list.1.weight"].shape == (8, 64)
    assert json.loads(json.dumps(zoo_info(zoo)))["accuracy"]["median"] == 0.5
