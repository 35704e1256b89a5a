"""The data pipeline end to end on a small mixed-architecture zoo in local S3 (moto) and Ray."""

import dataclasses
import threading
import time
import uuid

import boto3
import numpy as np
import pyarrow as pa
import pytest
import torch

from sane_ray import lease, storage
from sane_ray.data import DataConfig, DataPreparationError, SplitError, WindowSizeError, prepare_data
from sane_ray.data.canonical import cache_key
from sane_ray.data.format import CANONICAL_MANIFEST, load_manifest
from sane_ray.data.draw import token_rows
from sane_ray.weights.tokenize import detokenize, layout_mask, layout_positions
from sane_ray.zoo import native
from sane_ray.zoo.architectures import build_model, input_shape
from sane_ray.zoo.reader import load_checkpoint, open_zoo

TOKEN_SIZE = 64  # cnn_digits -> 50 tokens, mlp_digits -> 90 tokens


def write_zoo(root: str, n_cnn: int, n_mlp: int, epochs: int = 2, with_bad: bool = False) -> str:
    """Random, slightly drifting weights per epoch; optionally a diverged checkpoint and a mislabeled model."""
    rows = []
    models = [(f"cnn{i:02d}", "cnn_digits", {"activation": ("relu", "tanh")[i % 2]}) for i in range(n_cnn)]
    models += [(f"mlp{i:02d}", "mlp_digits", {}) for i in range(n_mlp)]
    for i, (mid, arch, kwargs) in enumerate(models):
        torch.manual_seed(i)
        net = build_model(arch, **kwargs)
        for epoch in range(epochs):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            sd = net.state_dict()
            if with_bad and mid == "cnn01" and epoch == 1:
                sd = {k: v.clone().fill_(float("nan")) for k, v in sd.items()}
            if with_bad and mid == "cnn02":
                sd = build_model("mlp_digits").state_dict()  # weights of another architecture
            rows.append(native.write_checkpoint(root, mid, epoch, sd, {"test_acc": 0.1 * epoch}, arch, kwargs))
    native.publish_manifest(root, rows)
    return root


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = f"pipe-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def zoo_cfg(bucket, ray_cluster):
    # window 90 = the mlp's whole sequence: every window is a whole model (cnn windows padded
    # from 50 tokens), so views can be checked as models; random starts are tested in test_windows.
    zoo = write_zoo(f"s3://{bucket}/zoo", n_cnn=9, n_mlp=4, with_bad=True)
    return DataConfig(
        zoo_uri=zoo, cache_uri=f"s3://{bucket}/cache", token_size=TOKEN_SIZE, window_size=90,
        split_seed=1, num_actors=2, actor_cpus=0.5, stream_cpus=0.5,
        architecture_weights=None,  # one window per checkpoint: no architecture balancing (test_windows has it)
    )


@pytest.fixture(scope="module")
def prepared(zoo_cfg):
    return prepare_data(zoo_cfg)


def _pass(prepared, seed=0, epoch=0, split="train", rank=0, world=1, batch_size=64) -> dict[str, torch.Tensor]:
    """One rank's windows of one epoch, concatenated in stream order."""
    ds = prepared.streams[split].dataset(seed, epoch, rank=rank, world=world)
    batches = list(ds.iter_torch_batches(batch_size=batch_size))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def train_pass(prepared):
    """One pass over the training windows, split between two ranks consuming concurrently."""
    shards = [prepared.streams["train"].dataset(0, 0, rank=r, world=2) for r in range(2)]
    outs: list[list] = [[], []]

    def consume(ds, out):
        out.extend(ds.iter_torch_batches(batch_size=4))

    threads = [threading.Thread(target=consume, args=(ds, out)) for ds, out in zip(shards, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(len(set(b["model_idx"].tolist())) == len(b["model_idx"]) for out in outs for b in out), \
        "a batch holds two windows of one model"
    return [{k: torch.cat([b[k] for b in out]) for k in out[0]} for out in outs]


def test_preparation_reports_zoo_facts_and_skips(prepared):
    data = prepared
    assert not data.cache_hit and data.cache_uri.startswith("s3://")
    assert data.sequence_lengths == {"cnn_digits": 50, "mlp_digits": 90}
    assert data.pad_position == (90, 4, 32)  # one past the largest real (n, l, k)
    reasons = " | ".join(f"{s.path}: {s.reason}" for s in data.skipped)
    assert "cnn02" in reasons and "do not match architecture" in reasons
    assert "cnn01/epoch_0001" in reasons and "non-finite" in reasons
    assert len(data.skipped) == 4  # cnn01 epoch 1, cnn02 epochs 0 and 1, and cnn02 as a whole
    assert all("cnn02" not in ids for ids in data.splits.values())
    assert {data.group_of(m).architecture for m in data.splits["train"]} == {"cnn_digits", "mlp_digits"}
    # models of one architecture share a layout (and statistics) whatever their activation
    assert data.stats_for("cnn_digits", {"activation": "gelu"}) is data.stats_of("cnn00")
    assert data.stats_for("mlp_digits") is not data.stats_of("cnn00")
    with pytest.raises(KeyError, match="resnet18 .* has no layout in this zoo"):
        data.stats_for("resnet18")


def test_two_ranks_share_one_pass_of_training_models_only(prepared, train_pass):
    data = prepared
    index = data.canonical.model_index
    train_idx = {index[m] for m in data.splits["train"]}
    seen = [part["model_idx"] for part in train_pass]
    stream = data.streams["train"]
    files = [set(stream.rank_files(0, r, 2)) for r in range(2)]
    assert not files[0] & files[1] and files[0] | files[1] == set(stream.files)  # every model read by one rank
    per_rank = stream.rows_per_rank(0, 2)
    assert len(seen[0]) == len(seen[1]) == per_rank  # equal counts: the same steps on every rank
    assert data.num_windows["train"] - per_rank * 2 <= 2  # one window per checkpoint: 2 checkpoints per model
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert set(torch.cat(seen).tolist()) <= train_idx  # only training models...
    assert len(set(torch.cat(seen).tolist())) >= len(train_idx) - 1  # ...and (all but at most one) all of them
    part = train_pass[0]
    assert part["x_i"].dtype == part["x_j"].dtype == torch.float32 and part["x_i"].shape[1:] == (90, TOKEN_SIZE)
    assert part["mask"].dtype == torch.bool and part["mask"].shape == part["x_i"].shape
    assert part["pos"].dtype == torch.int64 and part["pos"].shape[1:] == (90, 3)
    val_idx = {index[m] for m in data.splits["val"]}
    val = _pass(data, split="val")["model_idx"]
    assert set(val.tolist()) == val_idx and not (val_idx & train_idx)


def test_views_are_function_preserving_permutations(prepared, train_pass, zoo_cfg):
    """View i is the aligned checkpoint, view j a random permutation of it: after de-standardizing
    and detokenizing, both compute the stored checkpoint's function."""
    data = prepared
    zoo = open_zoo(zoo_cfg.zoo_uri)
    by_idx = {i: m for m, i in data.canonical.model_index.items()}
    x = torch.randn(16, *input_shape("cnn_digits"))
    checked = {"cnn_digits": 0, "mlp_digits": 0}
    for part in train_pass:
        for r in range(len(part["model_idx"])):
            model = zoo.model(by_idx[int(part["model_idx"][r])])
            group = data.group_of(model.model_id)
            layout, n = group.layout, group.sequence_length
            assert torch.equal(part["mask"][r, :n], layout_mask(layout)) and not part["mask"][r, n:].any()
            assert torch.equal(part["pos"][r, :n], layout_positions(layout))
            assert (part["pos"][r, n:] == torch.tensor(data.pad_position)).all()
            assert (part["x_i"][r, n:] == 0).all() and (part["x_j"][r, n:] == 0).all()
            stats = data.stats_of(model.model_id)
            ckpt = next(c for c in model.checkpoints if c.epoch == int(part["epoch"][r]))
            net = build_model(model.architecture, **model.arch_kwargs).eval()
            net.load_state_dict(load_checkpoint(model, ckpt))
            with torch.no_grad():
                want = net(x)
                for view in ("x_i", "x_j"):
                    net.load_state_dict(detokenize(stats.invert_tokens(part[view][r, :n], layout), layout))
                    torch.testing.assert_close(net(x), want, atol=1e-4, rtol=1e-4)
            assert not torch.equal(part["x_i"][r], part["x_j"][r])
            checked[model.architecture] += 1
    assert all(checked.values()), checked


def test_every_epoch_draws_fresh_views_and_the_same_epoch_the_same(prepared, train_pass):
    """Each checkpoint's window is its whole model here: a new epoch brings the same values under
    a new permutation; the same seed and epoch bring the same windows in the same order."""

    def by_checkpoint(part):
        keys = zip(part["model_idx"].tolist(), part["epoch"].tolist())
        return {k: (x_i, x_j) for k, x_i, x_j in zip(keys, part["x_i"], part["x_j"])}

    epoch0 = _pass(prepared, epoch=0)
    again0 = _pass(prepared, epoch=0, batch_size=5)
    assert all(torch.equal(epoch0[k], again0[k]) for k in epoch0)  # reproducible, order included
    other_seed = _pass(prepared, seed=1, epoch=0)
    assert not torch.equal(epoch0["x_j"], other_seed["x_j"])
    first = {k: v for part in train_pass for k, v in by_checkpoint(part).items()}
    epoch1 = _pass(prepared, epoch=1)
    assert not torch.equal(epoch0["model_idx"], epoch1["model_idx"])  # another order of models
    again = by_checkpoint(epoch1)
    assert len(again) == prepared.num_windows["train"] and len(set(first) & set(again)) >= len(first)
    changed = 0
    for k in first:
        (i0, j0), (i1, j1) = first[k], again[k]
        assert torch.equal(i0, i1)  # the aligned view is fixed
        torch.testing.assert_close(j0.flatten().sort().values, j1.flatten().sort().values)  # same weights...
        changed += not torch.equal(j0, j1)  # ...in another order
    assert changed >= len(first) - 1


def test_validation_draws_the_same_windows_every_epoch(prepared):
    first, later = _pass(prepared, epoch=0, split="val"), _pass(prepared, epoch=7, split="val")
    assert all(torch.equal(first[k], later[k]) for k in first)
    # two ranks share the checkpoints of every validation model (a split may hold fewer models than ranks)
    parts = [_pass(prepared, epoch=e, split="val", rank=r, world=2) for r in range(2) for e in (0, 3)]
    assert all(torch.equal(parts[0][k], parts[1][k]) and torch.equal(parts[2][k], parts[3][k]) for k in first)
    per_rank = prepared.streams["val"].rows_per_rank(0, 2)
    assert len(parts[0]["model_idx"]) == len(parts[2]["model_idx"]) == per_rank >= len(first["model_idx"]) // 2 - 1

    def checkpoints(part):
        return set(zip(part["model_idx"].tolist(), part["epoch"].tolist()))

    assert not checkpoints(parts[0]) & checkpoints(parts[2])
    assert len(checkpoints(parts[0]) | checkpoints(parts[2])) >= len(checkpoints(first)) - 1


def test_cache_is_reused_and_invalidated(prepared, zoo_cfg):
    fs, path = storage.open_uri(prepared.cache_uri)
    before = {p: fs.info(p)["LastModified"] for p in fs.find(path)}
    # a stream setting changes nothing upstream: same cache, nothing rewritten or re-tokenized
    again = prepare_data(DataConfig(**{**zoo_cfg.__dict__, "window_size": 16}))
    assert again.cache_hit and again.cache_uri == prepared.cache_uri
    assert {p: fs.info(p)["LastModified"] for p in fs.find(path)} == before
    assert again.num_windows["train"] > prepared.num_windows["train"]
    # a preprocessing setting gives another key, whose cache does not exist yet
    zoo = open_zoo(zoo_cfg.zoo_uri)
    for change in ({"token_size": 32}, {"align": False}, {"split_seed": 2}, {"include_bn": True}, {"epochs": [1]}):
        other = DataConfig(**{**zoo_cfg.__dict__, **change})
        assert cache_key(zoo, other) != cache_key(zoo, zoo_cfg), change
    moved = storage.join(zoo_cfg.cache_uri, cache_key(zoo, DataConfig(**{**zoo_cfg.__dict__, "token_size": 32})))
    assert load_manifest(moved) is None
    # so does a changed zoo listing (a model gone, a checkpoint rewritten)
    assert cache_key(dataclasses.replace(zoo, models=zoo.models[1:]), zoo_cfg) != cache_key(zoo, zoo_cfg)
    first = zoo.models[0]
    rewritten = dataclasses.replace(first, checkpoints=[dataclasses.replace(first.checkpoints[0], sha256="0" * 64)])
    assert cache_key(dataclasses.replace(zoo, models=[rewritten, *zoo.models[1:]]), zoo_cfg) != cache_key(zoo, zoo_cfg)


@pytest.mark.faults
def test_a_second_run_waits_for_the_cache_another_run_builds(prepared, zoo_cfg, monkeypatch, caplog):
    """While another run holds the cache's lease (it is building), a second run writes nothing
    beside it: it waits, then reuses what the first one publishes."""
    from sane_ray.data import pipeline

    monkeypatch.setattr(pipeline, "CACHE_POLL_S", 0.2)
    manifest = storage.join(prepared.cache_uri, CANONICAL_MANIFEST)
    body = storage.read_bytes(manifest)
    storage.remove(manifest)  # the cache as its builder leaves it until the end: no manifest yet
    fs, path = storage.open_uri(prepared.cache_uri)
    before = {p: fs.info(p)["LastModified"] for p in fs.find(path)}
    builder = lease.acquire(prepared.cache_uri, "canonical zoo build")
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(prepare_data(zoo_cfg)), daemon=True)
    try:
        with caplog.at_level("INFO", logger="sane_ray.data.pipeline"):
            waiter.start()
            deadline = time.monotonic() + 120
            while "waiting for the canonical zoo another run is building" not in caplog.text:
                assert waiter.is_alive() and time.monotonic() < deadline, got
                time.sleep(0.1)
        assert f"{prepared.cache_uri} is being written by canonical zoo build" in caplog.text
        time.sleep(1)
        assert {p: fs.info(p)["LastModified"] for p in fs.find(path) if not p.endswith(lease.LEASE_FILE)} == before
        storage.write_bytes_atomic(manifest, body)  # the builder publishes
    finally:
        builder.release()
    waiter.join(timeout=120)
    assert got and got[0].cache_hit and got[0].cache_uri == prepared.cache_uri


def test_token_column_is_viewed_without_copies():
    rows = [np.arange(6, dtype=np.float32), np.arange(10, 14, dtype=np.float32)]
    chunked = pa.chunked_array([pa.array([r.tobytes()], pa.large_binary()) for r in rows])
    flat, offsets, lengths = token_rows(chunked, 2)
    assert torch.equal(flat, torch.tensor([[0.0, 1], [2, 3], [4, 5], [10, 11], [12, 13]]))
    assert offsets.tolist() == [0, 3] and lengths.tolist() == [3, 2]
    flat, offsets, lengths = token_rows(pa.array([r.tobytes() for r in rows], pa.large_binary()).slice(1), 2)
    assert torch.equal(flat, torch.tensor([[10.0, 11], [12, 13]])) and offsets.tolist() == [0] and lengths.tolist() == [2]


def test_bad_input_fails_before_heavy_work(tmp_path, ray_cluster):
    zoo = write_zoo(str(tmp_path / "zoo"), n_cnn=2, n_mlp=0, epochs=1)
    cache = tmp_path / "cache"
    with pytest.raises(SplitError, match="has 2 usable model.*need at least 3"):
        prepare_data(DataConfig(zoo_uri=zoo, cache_uri=str(cache), token_size=TOKEN_SIZE))
    zoo = write_zoo(str(tmp_path / "zoo3"), n_cnn=3, n_mlp=0, epochs=1)
    with pytest.raises(WindowSizeError, match="window_size=51 .*longest: cnn_digits with 50 tokens"):
        prepare_data(DataConfig(zoo_uri=zoo, cache_uri=str(cache), token_size=TOKEN_SIZE, window_size=51))
    with pytest.raises(DataPreparationError, match="reference_model .nope. must be a training model; it is not in"):
        prepare_data(DataConfig(zoo_uri=zoo, cache_uri=str(cache), token_size=TOKEN_SIZE, window_size=8,
                                reference_model="nope"))
    assert not cache.exists()  # nothing was built
    with pytest.raises(ValueError, match="token_size must be an integer >= 1"):
        DataConfig(zoo_uri=zoo, token_size=0)
