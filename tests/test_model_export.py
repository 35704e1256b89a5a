"""Export of a trained model and ``load_sane`` (local and S3): round trip, checksums, one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sane_ray import storage
from sane_ray.checksums import DIGEST_FILE, write_digests
from sane_ray.model import SaneModel, tiny
from sane_ray.model.export import CONFIG_FILE, MODEL_FILE, ExportError, export_model, load_sane, read_export

CFG = dataclasses.replace(tiny(), window_size=8, d_model=32, d_z=8)


def _model() -> SaneModel:
    torch.manual_seed(4)
    return SaneModel(CFG)


def _check_round_trip(uri: str) -> None:
    model = _model()
    export_model(model.state_dict(), CFG, uri, extra_files={"stats.json": b'{"a": 1}'})
    loaded = load_sane(uri)
    assert loaded.cfg == CFG and not loaded.training
    x = torch.randn(2, 8, CFG.d_t)
    pos = torch.randint(0, 30, (2, 8, 3))
    torch.testing.assert_close(loaded.encode(x, pos), model.eval().encode(x, pos), rtol=0, atol=0)
    assert read_export(uri)["stats.json"] == b'{"a": 1}'
    assert storage.exists(storage.join(uri, DIGEST_FILE))


def test_round_trip_local(tmp_path):
    _check_round_trip(str(tmp_path / "run"))


def test_round_trip_s3(s3):
    _check_round_trip(f"s3://{s3['bucket']}/runs/r1")


def _one_line_error(uri: str, match: str) -> str:
    with pytest.raises(ExportError, match=match) as info:
        load_sane(uri)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_export_errors(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="may not be named"):
        export_model(model.state_dict(), CFG, str(tmp_path), extra_files={MODEL_FILE: b""})
    with pytest.raises(ValueError, match="may not be named"):
        export_model(model.state_dict(), CFG, str(tmp_path), extra_files={DIGEST_FILE: b""})
    run = str(tmp_path / "run")
    export_model(model.state_dict(), CFG, run)
    weights = tmp_path / "run" / MODEL_FILE
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated
    assert str(weights) in _one_line_error(run, "truncated")
    weights.unlink()
    assert str(weights) in _one_line_error(run, "missing")
    weights.write_bytes(good[:-4] + b"\0\0\0\0")  # same size, other content
    assert str(weights) in _one_line_error(run, "altered")
    assert "checksums" in _one_line_error(str(tmp_path / "nowhere"), "no checksums")


def _rewrite(run: str, name: str, data: bytes) -> None:
    """Replace one file and re-record the checksums, as a writer of a wrong export would."""
    with open(storage.join(run, name), "wb") as f:
        f.write(data)
    write_digests(run, [MODEL_FILE, CONFIG_FILE])


def test_intact_but_wrong_files(tmp_path):
    """Checksums that match but content that does not parse or fit: still one line naming the file."""
    run = str(tmp_path / "run")
    export_model(_model().state_dict(), CFG, run)
    good_model = (tmp_path / "run" / MODEL_FILE).read_bytes()
    _rewrite(run, MODEL_FILE, b"not a safetensors file at all")
    assert MODEL_FILE in _one_line_error(run, "not a safetensors file")
    _rewrite(run, MODEL_FILE, good_model)
    _rewrite(run, CONFIG_FILE, json.dumps(dataclasses.asdict(dataclasses.replace(CFG, d_model=64))).encode())
    _one_line_error(run, "does not match")
    _rewrite(run, CONFIG_FILE, b"{not json")
    assert CONFIG_FILE in _one_line_error(run, "invalid SANE config")
