"""Storage URIs: local and S3 (moto over real HTTP) behave the same."""

import os
import pickle

import pyarrow.fs as pafs
import pytest

from sane_ray import storage


def test_parse_uri_forms(tmp_path):
    assert storage.parse_uri(str(tmp_path)).scheme == "file"
    assert storage.parse_uri(f"file://{tmp_path}").path == str(tmp_path)
    loc = storage.parse_uri("s3://bucket/a/b/")
    assert (loc.scheme, loc.path, loc.uri) == ("s3", "bucket/a/b", "s3://bucket/a/b")
    with pytest.raises(storage.StorageError, match="unsupported storage scheme"):
        storage.parse_uri("gopher://x/y")
    with pytest.raises(storage.StorageError, match="without a bucket"):
        storage.parse_uri("s3:///x")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_atomic_write_read_list(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        root = f"s3://{s3['bucket']}/root"
    else:
        root = str(tmp_path / "root")
    uri = storage.join(root, "a", "b.bin")
    storage.write_bytes_atomic(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    storage.write_bytes_atomic(uri, b"again")
    assert storage.read_bytes(uri) == b"again"
    assert storage.exists(uri)
    assert storage.listdir(storage.join(root, "a")) == ["b.bin"]
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(storage.join(root, "missing.bin"))
    if where == "local":  # no temporary file is left beside the target
        assert os.listdir(tmp_path / "root" / "a") == ["b.bin"]


def test_pyarrow_fs_reads_what_fsspec_wrote(s3):
    uri = f"s3://{s3['bucket']}/x/y.txt"
    storage.write_bytes_atomic(uri, b"pyarrow sees this")
    fs, path = storage.pyarrow_fs(uri)
    assert isinstance(fs, pafs.PyFileSystem)  # over s3fs: keeps its retries when Ray pickles it
    shipped = pickle.loads(pickle.dumps(fs))
    for f in (fs, shipped):
        with f.open_input_stream(path) as stream:
            assert stream.read() == b"pyarrow sees this"


def test_env_vars_for_workers(s3):
    env = storage.S3Options().env_vars()
    assert env["AWS_ENDPOINT_URL"] == s3["endpoint"]
    assert env["AWS_ACCESS_KEY_ID"] == "testing"
