"""Broken zoos: every planted fault is skipped with its path and reason, every good
checkpoint survives, and roots that hold no zoo fail with one clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch
import zoo_builders as zb

from sane_ray import storage
from sane_ray.zoo.architectures import UnknownArchitectureError
from sane_ray.zoo.checks import BadCheckpointError, ZooError
from sane_ray.zoo.info import zoo_info
from sane_ray.zoo.reader import load_checkpoint, open_zoo
from sane_ray.zoo.spec import ModelRecord


def _ckpt(name: str, epoch: int) -> str:
    return f"{name}/checkpoint_{epoch:06d}/checkpoints"


def plant_faults(root: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """A 9-model public zoo (epochs 0-2) with faults; returns (good epochs per model, skipped path -> reason)."""
    states = zb.build_public_zoo(root, n_models=9, epochs=2)
    name = {i: zb.public_model_name(i) for i in range(9)}
    uri = lambda rel: storage.join(root, rel)  # noqa: E731
    bad: dict[str, str] = {}

    def plant(i: int, epoch: int, data: bytes, reason: str) -> None:
        rel = _ckpt(name[i], epoch)
        zb.put(root, rel, data)
        bad[uri(rel)] = reason

    def edited(i: int, epoch: int, key: str, fn) -> bytes:
        sd = dict(states[name[i]][epoch])
        sd[key] = fn(sd[key])
        return zb.torch_bytes(sd)

    w = "module_list.0.weight"
    plant(1, 1, edited(1, 1, w, lambda t: t.index_fill(0, torch.tensor([2]), math.nan)), "non-finite (NaN/Inf)")
    plant(1, 2, edited(1, 2, "module_list.11.bias", lambda t: t.index_fill(0, torch.tensor([0]), math.inf)),
          "non-finite (NaN/Inf)")
    plant(2, 1, edited(2, 1, w, lambda t: t * 1e9), "weights too large")
    full = zb.torch_bytes(states[name[2]][2])
    plant(2, 2, full[: len(full) // 2], "torch.load failed")
    plant(3, 1, b"\x89PNG not a checkpoint at all" * 10, "torch.load failed")
    zb.remove(root, _ckpt(name[3], 2))
    zb.put(root, f"{name[3]}/checkpoint_000002/.tune_metadata", b"{}")  # the directory stays
    bad[uri(f"{name[3]}/checkpoint_000002")] = "no 'checkpoints' file"
    zb.remove(root, f"{name[4]}/result.json")
    bad[uri(name[4])] = "missing result.json"
    zb.put(root, f"{name[5]}/params.json", b'{"model::type": "CNN", ')
    bad[uri(name[5])] = "malformed params.json"
    zb.put(root, f"{name[6]}/params.json", json.dumps({**zb.public_params(6), "model::type": "VGG11"}).encode())
    bad[uri(name[6])] = "unknown architecture model::type='VGG11'"
    for epoch in range(3):
        plant(7, epoch, edited(7, epoch, w, lambda t: t * math.nan), "non-finite (NaN/Inf)")
    bad[uri(name[7])] = "no usable checkpoints"
    plant(8, 1, edited(8, 1, w, lambda t: t[:, :, :4, :4]), "shapes do not match architecture")
    sd = dict(states[name[8]][2])
    sd["module_list.13.weight"] = sd.pop("module_list.11.weight")
    plant(8, 2, zb.torch_bytes(sd), "keys do not match architecture")

    good = {name[0]: [0, 1, 2], name[1]: [0], name[2]: [0], name[3]: [0], name[8]: [0]}
    return good, bad


@pytest.mark.parametrize("where", ["local", "s3"])
def test_planted_faults_are_skipped_and_reported(where, tmp_path, request, caplog):
    s3 = request.getfixturevalue("s3") if where == "s3" else None
    root = zb.root_uri(where, tmp_path, s3)
    good, bad = plant_faults(root)
    with caplog.at_level("WARNING", logger="sane_ray.zoo"):
        zoo = open_zoo(root, verify=True, workers=4)
    assert {m.model_id: m.epochs for m in zoo.models} == good
    assert sorted(s.path for s in zoo.skipped) == sorted(bad)
    for s in zoo.skipped:
        assert bad[s.path] in s.reason, (s.path, s.reason)
        assert s.path in caplog.text
    info = zoo_info(zoo)
    assert (info["models"], info["checkpoints"], len(info["skipped"])) == (5, 7, len(bad))
    assert {s["path"] for s in info["skipped"]} == set(bad)


def test_each_bad_checkpoint_raises_with_path_and_reason(tmp_path):
    root = str(tmp_path / "zoo")
    _, bad = plant_faults(root)
    listed = open_zoo(root)  # no verification: listing keeps every checkpoint that has a file
    checkpoint_faults = {p: r for p, r in bad.items() if p.endswith("/checkpoints")}
    seen = 0
    for model in listed.models:
        for ckpt in model.checkpoints:
            if ckpt.uri in checkpoint_faults:
                with pytest.raises(BadCheckpointError) as err:
                    load_checkpoint(model, ckpt)
                assert err.value.path == ckpt.uri and checkpoint_faults[ckpt.uri] in err.value.reason
                seen += 1
            else:
                assert load_checkpoint(model, ckpt)["module_list.0.weight"].dtype == torch.float32
    assert seen == len(checkpoint_faults) == 10


def test_weight_threshold_is_configurable(tmp_path):
    root = str(tmp_path / "zoo")
    states = zb.build_public_zoo(root, n_models=1, epochs=0)
    (name,) = states
    sd = {k: v * 50 for k, v in states[name][0].items()}
    zb.put(root, _ckpt(name, 0), zb.torch_bytes(sd))
    (model,) = open_zoo(root).models
    assert load_checkpoint(model, model.last)["module_list.0.weight"].abs().max() > 1
    with pytest.raises(BadCheckpointError, match=r"max \|w\| = .* in module_list\.\d+\.\w+ exceeds 1"):
        load_checkpoint(model, model.last, max_abs=1.0)
    assert open_zoo(root, verify=True, max_abs=1.0).models == []


def test_float64_checkpoint_loads_as_float32(tmp_path):
    root = str(tmp_path / "zoo")
    states = zb.build_public_zoo(root, n_models=1, epochs=0)
    (name,) = states
    zb.put(root, _ckpt(name, 0), zb.torch_bytes({k: v.double() for k, v in states[name][0].items()}))
    (model,) = open_zoo(root).models
    loaded = load_checkpoint(model, model.last)
    assert all(t.dtype == torch.float32 and torch.equal(t, states[name][0][k]) for k, t in loaded.items())


def test_not_a_state_dict(tmp_path):
    root = str(tmp_path / "zoo")
    states = zb.build_public_zoo(root, n_models=1, epochs=0)
    (name,) = states
    zb.put(root, _ckpt(name, 0), zb.torch_bytes([1, 2, 3]))
    (model,) = open_zoo(root).models
    with pytest.raises(BadCheckpointError, match="not a state dict of named tensors"):
        load_checkpoint(model, model.last)


def test_unknown_architecture_on_load(tmp_path):
    root = str(tmp_path / "zoo")
    zb.build_public_zoo(root, n_models=1, epochs=0)
    (model,) = open_zoo(root).models
    stranger = ModelRecord(model.model_id, "transformer_xl", {}, {}, model.checkpoints)
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'transformer_xl'"):
        load_checkpoint(stranger, stranger.last)


def test_unreadable_roots(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ZooError, match="it does not exist") as err:
        open_zoo(missing)
    assert missing in str(err.value)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ZooError, match="is a file, not a zoo directory"):
        open_zoo(str(tmp_path / "file.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match="the directory is empty"):
        open_zoo(str(tmp_path / "empty"))
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "other" / "sub" / "notes.txt").write_text("hi")
    with pytest.raises(ZooError, match=r"expected one of the layouts .*native \(manifest.parquet\), .*public \(model directories containing params.json\)"):
        open_zoo(str(tmp_path / "other"))
    with pytest.raises(ZooError, match="unsupported storage scheme"):
        open_zoo("gopher://host/zoo")


def test_unreadable_s3_roots(s3):
    for uri in (f"s3://{s3['bucket']}/no/such/zoo", "s3://no-such-bucket-for-sane-ray/zoo"):
        with pytest.raises(ZooError) as err:
            open_zoo(uri)
        assert uri in str(err.value)


def test_unreadable_params_json_skips_only_that_model(tmp_path):
    root = str(tmp_path / "zoo")
    states = zb.build_public_zoo(root, n_models=2, epochs=0)
    first, second = sorted(states)
    zb.put(root, f"{first}/params.json", b"\xff\xfe\x00 not utf-8 json")
    zb.put(root, f"{second}/params.json", b"[1, 2]")
    zb.put(root, "third/checkpoint_000000/checkpoints", zb.torch_bytes(states[first][0]))
    zb.put(root, "fourth/params.json", json.dumps(zb.public_params(4)).encode())
    zb.put(root, "fourth/result.json", zb.result_lines(4, 0))
    zoo = open_zoo(root)
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in zoo.skipped}
    assert zoo.models == []
    assert reasons[first].startswith("malformed params.json")
    assert reasons[second] == "malformed params.json: not a JSON object"
    assert reasons["third"] == "missing params.json"
    assert reasons["fourth"] == "no checkpoints"
