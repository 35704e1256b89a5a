"""Nothing lost under faults (issue 8): verified checkpoints with fallback, resume that says
what it does, one writer at a time, storage outages, and one-line errors."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest
from ray.train import TrainingFailedError
from s3_proxy import FaultyS3Proxy

from sane_ray import checksums, cluster, lease, storage
from sane_ray.checksums import IntegrityError
from sane_ray.data.config import DataConfig
from sane_ray.model import SaneModel, tiny
from sane_ray.model.export import load_sane
from sane_ray.train import TrainConfig, train_sane
from sane_ray.train.checkpoint import TrainState, verify_checkpoint
from sane_ray.train.config import OptimConfig
from sane_ray.train.optim import build_optimizer
from sane_ray.train.resume import (
    RAY_SNAPSHOT,
    ResumeError,
    ResumeStorageError,
    checkpoint_dirs,
    preflight,
    restore,
)
from sane_ray.train.synthetic import synthetic_dataset
from sane_ray.train.trainer import PretrainingFailedError

pytestmark = [pytest.mark.timeout(300), pytest.mark.faults]

MODEL = dataclasses.replace(tiny(), window_size=8, d_model=32, d_z=8, projection_dim=8)
WORKERS = dict(num_workers=2, resources_per_worker={"CPU": 1}, controller_failure_limit=0)
# The outage the storage test survives; the issue asks for 20 s (SANE_RAY_TEST_OUTAGE_S shortens it).
OUTAGE_S = float(os.environ.get("SANE_RAY_TEST_OUTAGE_S", "20"))


def _cfg(**kw) -> TrainConfig:
    # steps_per_epoch given: 64 windows / 2 workers / batch 8, without a counting pass over the data
    base = dict(model=MODEL, optim=OptimConfig(lr=1e-3), epochs=3, batch_size=8, num_threads=1,
                checkpoints_to_keep=2, max_failures=0, steps_per_epoch=4)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def datasets(ray_cluster):
    return {"train": synthetic_dataset(64, MODEL, seed=0)}


def _stop_at(epoch: int):
    def hook(rank: int, done: int) -> None:
        if done == epoch:
            import torch.distributed as dist  # inside: hooks are pickled by value, this module is not on the workers

            if dist.is_initialized():  # every rank's checkpoint upload is done before the fault
                dist.barrier()
            raise RuntimeError("interrupted")
    return hook


def _wait_for(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not storage.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout:.0f} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def interrupted_run(datasets, tmp_path_factory):
    """A run named "run" stopped after epoch 2 of 3 (checkpoints of epochs 1 and 2).

    While it trains, a second run into the same directory is attempted: returns the run
    directory, the error of that run and the second writer's error.
    """
    root = str(tmp_path_factory.mktemp("faults"))
    run = os.path.join(root, "run")
    second: list[BaseException] = []

    def second_writer() -> None:
        _wait_for(os.path.join(run, lease.LEASE_FILE))
        try:
            train_sane(_cfg(), datasets, root, "run", **WORKERS)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            second.append(e)

    thread = threading.Thread(target=second_writer, daemon=True)
    thread.start()
    with pytest.raises(PretrainingFailedError) as failed:
        train_sane(_cfg(), datasets, root, "run", on_epoch_end=_stop_at(2), **WORKERS)
    thread.join(timeout=60)
    assert len(checkpoint_dirs(run)) == 2
    return run, failed.value, second[0] if second else None


def _damage(checkpoint: str, fault: str) -> None:
    if fault == "truncated":
        shard = os.path.join(checkpoint, "__1_0.distcp")
        os.truncate(shard, os.path.getsize(shard) // 2)
    elif fault == "missing":
        os.remove(os.path.join(checkpoint, "__0_0.distcp"))
    elif fault == "bit-flipped":
        shard = os.path.join(checkpoint, "__1_0.distcp")
        with open(shard, "rb") as f:
            data = bytearray(f.read())
        start = max(0, len(data) // 2 - 2048)
        for i in range(start, min(len(data), start + 4096)):
            data[i] ^= 0xFF
        with open(shard, "wb") as f:
            f.write(bytes(data))
    elif fault == "unregistered":  # Ray's registry lags: it knows neither checkpoint
        os.remove(os.path.join(os.path.dirname(checkpoint), RAY_SNAPSHOT))
    else:
        raise ValueError(fault)


def _copy(run: str, tmp_path) -> tuple[str, str]:
    root = str(tmp_path / "copy")
    shutil.copytree(run, os.path.join(root, "run"))
    return root, os.path.join(root, "run")


def test_run_failure_is_one_line_and_second_writer_is_refused(interrupted_run):
    run, failed, second = interrupted_run
    first_line = str(failed).splitlines()[0]
    assert first_line.startswith(f"pretraining into {run} failed after 0 restart(s) (train.max_failures)")
    assert "RuntimeError: interrupted" in first_line and "rerun to resume" in first_line
    assert isinstance(failed, TrainingFailedError)  # still Ray's type for API callers
    assert isinstance(second, lease.LeaseHeldError), second
    assert f"{run} is being written by pretraining on host {socket.gethostname()} pid {os.getpid()}" in str(second)
    assert "since" in str(second)
    assert not os.path.exists(os.path.join(run, lease.LEASE_FILE))  # released when the run ended


@pytest.mark.parametrize("fault", ["truncated", "missing", "bit-flipped"])
def test_every_kind_of_damage_is_detected(interrupted_run, tmp_path, fault):
    """What makes the resume below fall back: each damage fails verification, naming the checkpoint."""
    _, run = _copy(interrupted_run[0], tmp_path)
    newest = checkpoint_dirs(run)[-1]
    _damage(os.path.join(run, newest), fault)
    with pytest.raises(IntegrityError, match=newest):
        verify_checkpoint(os.path.join(run, newest))


# One damage of the checkpoint (all kinds take the path test_every_kind_of_damage_is_detected checks), and
# Ray's registry lagging behind storage: each a full resumed run.
@pytest.mark.parametrize("fault", ["bit-flipped", "unregistered"])
def test_bad_latest_checkpoint_falls_back_and_finishes(interrupted_run, datasets, tmp_path, fault):
    root, run = _copy(interrupted_run[0], tmp_path)
    older, newest = checkpoint_dirs(run)
    _damage(os.path.join(run, newest), fault)
    history = train_sane(_cfg(), datasets, root, "run", **WORKERS).return_value
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0]  # every epoch once
    if fault == "unregistered":  # the newest checkpoint on storage wins over Ray's (empty) registry
        assert [h["resumed_from_epoch"] for h in history] == [0.0, 0.0, 2.0]
    else:
        assert [h["resumed_from_epoch"] for h in history] == [0.0, 1.0, 1.0]
    kept = checkpoint_dirs(run)
    assert len(kept) == 2 and older not in kept  # checkpoints_to_keep holds for all, registered or not
    assert (newest in kept) == (fault == "unregistered")  # a damaged one is removed
    for name in kept:
        verify_checkpoint(os.path.join(run, name))
    load_sane(run)


def _fresh_state() -> TrainState:
    model = SaneModel(MODEL)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3), total_steps=12)
    return TrainState(model, opt, sched)


def test_resume_says_which_checkpoint_and_why_newer_were_skipped(interrupted_run, tmp_path, capsys):
    _, run = _copy(interrupted_run[0], tmp_path)
    older, newest = checkpoint_dirs(run)
    _damage(os.path.join(run, newest), "truncated")
    with pytest.raises(IntegrityError, match="__1_0.distcp.*truncated"):
        verify_checkpoint(os.path.join(run, newest))
    state = _fresh_state()
    capsys.readouterr()
    restore(state, run, keep=2)
    lines = capsys.readouterr().out.splitlines()
    assert state.epoch == 1 and len(state.history) == 1
    assert len(lines) == 1
    assert lines[0].startswith(f"resuming {run} after epoch 1 from {older}; skipped 1 newer: ")
    assert f"{newest}/__1_0.distcp" in lines[0] and "truncated" in lines[0]
    assert checkpoint_dirs(run) == [older]  # the unusable one is gone


def test_no_usable_checkpoint_stops_before_training(interrupted_run, datasets, tmp_path):
    root, run = _copy(interrupted_run[0], tmp_path)
    older, newest = checkpoint_dirs(run)
    _damage(os.path.join(run, older), "missing")
    _damage(os.path.join(run, newest), "bit-flipped")
    with pytest.raises(ResumeError) as e:
        train_sane(_cfg(), datasets, root, "run", **WORKERS)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no usable checkpoint in {run}: ")
    assert f"{older}/__0_0.distcp: missing" in msg and f"{newest}/__1_0.distcp" in msg and "altered" in msg
    assert checkpoint_dirs(run) == [older, newest]  # nothing removed: the user decides


def test_checkpoint_digests_need_every_rank(interrupted_run, tmp_path):
    _, run = _copy(interrupted_run[0], tmp_path)
    newest = os.path.join(run, checkpoint_dirs(run)[-1])
    assert sorted(n for n in os.listdir(newest) if n.startswith("checksums")) == [
        "checksums-rank0-of-2.json", "checksums-rank1-of-2.json"]
    contents = verify_checkpoint(newest)
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(contents)
    os.remove(os.path.join(newest, "checksums-rank1-of-2.json"))
    with pytest.raises(IntegrityError, match="checksums of rank 1 of 2 missing"):
        verify_checkpoint(newest)


# ---------------------------------------------------------------- storage errors while resuming


@pytest.fixture()
def s3_run(s3) -> tuple[str, list[str]]:
    """A run directory in the test's bucket with checkpoints of epochs 1 and 2, saved in this process."""
    from sane_ray.train.checkpoint import save_train_state

    run = f"s3://{s3['bucket']}/runs/run"
    fs, path = storage.open_uri(run)
    names = []
    for epoch in (1, 2):
        state = _fresh_state()
        state.epoch = epoch
        local = tempfile.mkdtemp(prefix="sane-test-ckpt-")
        save_train_state(state, local)
        names.append(f"checkpoint_2026-01-01_00-00-0{epoch}.000000")
        fs.put(local + "/", f"{path}/{names[-1]}/", recursive=True)
        shutil.rmtree(local)
    return run, names


def _keys(uri: str) -> list[str]:
    fs, path = storage.open_uri(uri)
    return sorted(fs.find(path))


def _faulty(s3: dict, newest: str, fault: str, times: int | None = None) -> FaultyS3Proxy:
    """A proxy that answers ``fault`` to GETs of the newest checkpoint's shard (the first ``times`` only)."""
    def rule(method: str, path: str) -> str | None:
        if method != "GET" or not path.endswith(f"/{newest}/__0_0.distcp"):
            return None
        return fault if times is None or len(proxy.injected) < times else None

    proxy = FaultyS3Proxy(s3["endpoint"], rule)
    return proxy


FAST_S3 = dict(retries=1, connect_timeout_s=1, request_timeout_s=5)  # seconds per fault, not minutes


@pytest.mark.parametrize("fault", ["503", "403", "cut"])
def test_storage_errors_while_verifying_delete_nothing(s3_run, s3, monkeypatch, fault):
    """Throttling, a refused permission and a body cut short are no proof of a bad checkpoint: the
    resume stops in one line naming the file, on the driver and in a worker, and every file stays."""
    run, (older, newest) = s3_run
    before = _keys(run)
    monkeypatch.setattr(checksums, "READ_BACKOFF_S", 0.1)
    proxy = _faulty(s3, newest, fault)
    opts = storage.S3Options(endpoint_url=proxy.endpoint, **FAST_S3)
    try:
        with pytest.raises(ResumeStorageError) as driver:  # the driver's check before fit()
            preflight(run, opts)
        with pytest.raises(ResumeStorageError) as worker:  # every worker start; keep=1 would prune the older
            restore(_fresh_state(), run, keep=1, s3=opts)
    finally:
        proxy.close()
    assert len(proxy.injected) >= 2 * checksums.READ_ATTEMPTS  # retried on both paths
    for e in (driver.value, worker.value):
        msg = str(e)
        assert "\n" not in msg
        assert msg.startswith(f"cannot resume {run}: checkpoint {newest} could not be read "
                              f"(cannot read {run}/{newest}/__0_0.distcp: ")
        assert msg.endswith("nothing was deleted, rerun once the storage answers")
    assert _keys(run) == before


def test_a_transient_storage_error_while_verifying_is_ridden_out(s3_run, s3, monkeypatch):
    run, (older, newest) = s3_run
    monkeypatch.setattr(checksums, "READ_BACKOFF_S", 0.1)
    proxy = _faulty(s3, newest, "refuse", times=3)
    try:
        state = _fresh_state()
        restore(state, run, keep=2, s3=storage.S3Options(endpoint_url=proxy.endpoint, **FAST_S3))
    finally:
        proxy.close()
    assert len(proxy.injected) == 3
    assert state.epoch == 2 and checkpoint_dirs(run) == [older, newest]


def test_a_truncated_checkpoint_on_s3_is_still_proven_bad(s3_run):
    run, (older, newest) = s3_run
    fs, path = storage.open_uri(f"{run}/{newest}/__0_0.distcp")
    fs.pipe_file(path, fs.cat_file(path)[:100])
    state = _fresh_state()
    restore(state, run, keep=2)
    assert state.epoch == 1 and checkpoint_dirs(run) == [older]


# ---------------------------------------------------------------- storage outage


class PausableProxy:
    """A TCP proxy in front of an endpoint; :meth:`pause` refuses and drops every connection for a while."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.paused_until = 0.0
        self.refused = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pause(self, seconds: float) -> None:
        self.paused_until = time.monotonic() + seconds
        with self._lock:
            for c in self._conns:
                _close(c)
            self._conns.clear()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            if time.monotonic() < self.paused_until:
                self.refused += 1
                _close(client)
                continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def test_storage_outage_mid_run_is_ridden_out(datasets, s3):
    """The endpoint refuses every connection for OUTAGE_S seconds after the first checkpoint;
    with no restarts allowed, the run still finishes every epoch once and every checkpoint verifies."""
    host, port = s3["endpoint"].removeprefix("http://").split(":")
    proxy = PausableProxy((host, int(port)))
    opts = storage.S3Options(endpoint_url=proxy.endpoint, connect_timeout_s=2, request_timeout_s=10)
    out = f"s3://{s3['bucket']}/runs"
    run = f"{out}/outage"

    def pause_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 180
        while not checkpoint_dirs(run) and time.monotonic() < deadline:  # direct to moto, not via the proxy
            time.sleep(0.2)
        proxy.pause(OUTAGE_S)

    threading.Thread(target=pause_after_first_checkpoint, daemon=True).start()
    start = time.monotonic()
    result = train_sane(_cfg(epochs=4, checkpoints_to_keep=4), datasets, out, "outage", s3=opts, **WORKERS)
    assert time.monotonic() - start > OUTAGE_S and proxy.refused > 0  # the outage happened during the run
    history = result.return_value
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    assert all(h["resumed_from_epoch"] == 0.0 for h in history)
    kept = checkpoint_dirs(run)
    assert len(kept) == 4
    for name in kept:
        verify_checkpoint(f"{run}/{name}")
    assert len(storage.listdir(f"{run}/logs")) == 1  # the run's log, written locally, copied to S3 at the end


def test_s3_retry_settings_reach_both_filesystems():
    opts = storage.S3Options(endpoint_url="http://127.0.0.1:9", access_key="AK", secret_key="s3cr3t", session_token="t0ken",
                             retries=7, connect_timeout_s=1.5, request_timeout_s=4)
    assert "s3cr3t" not in repr(opts) and "t0ken" not in repr(opts)
    assert "s3cr3t" not in repr(storage.parse_uri("s3://b/k", opts))
    fs, _ = storage.open_uri("s3://b/k", opts)
    assert fs.config_kwargs["retries"] == {"max_attempts": 7, "mode": "standard"}
    assert (fs.config_kwargs["connect_timeout"], fs.config_kwargs["read_timeout"]) == (1.5, 4)
    pa_fs, _ = storage.pyarrow_fs("s3://b/k", opts)  # what Ray Data and Ray Train use, pickled to workers
    shipped = pickle.loads(pickle.dumps(pa_fs)).handler.fs
    assert shipped.config_kwargs == fs.config_kwargs


# ---------------------------------------------------------------- leases


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lease_refuses_a_second_writer_and_takes_over_a_stale_one(where, tmp_path, s3_server, caplog):
    if where == "s3":
        import boto3

        bucket = f"lease-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=bucket)
        location = f"s3://{bucket}/zoo"
    else:
        location = str(tmp_path / "zoo")
    first = lease.acquire(location, "make-zoo")
    with pytest.raises(lease.LeaseHeldError, match=rf"being written by make-zoo on host .* pid {os.getpid()} since "):
        lease.acquire(location, "make-zoo")
    # the holder's process is gone: the lease is stale at once and is taken over, saying so
    first.release()
    ghost = lease.acquire(location, "make-zoo")
    ghost._stop.set()
    ghost.holder["pid"] = _dead_pid()
    lease._write(ghost.uri, ghost.holder, None, if_match=ghost.etag)
    with caplog.at_level("WARNING", logger="sane_ray.lease"):
        taker = lease.acquire(location, "make-zoo")
    assert f"taking over the stale lease on {location}" in caplog.text and f"pid {ghost.holder['pid']}" in caplog.text
    ghost.release()  # no longer its lease: leaves the taker's alone
    assert storage.exists(taker.uri)
    # a live holder that stopped renewing is stale after stale_after_s
    with pytest.raises(lease.LeaseHeldError):
        lease.acquire(location, "other", stale_after_s=60)
    second = lease.acquire(location, "other", stale_after_s=0.0)
    taker.release()
    assert storage.exists(second.uri)
    second.release()
    assert not storage.exists(second.uri)


# ---------------------------------------------------------------- zoos: one writer, safe overwrite


ZOO = ["--models", "2", "--epochs", "1", "--seed", "3"]


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run the CLI in-process; returns the exit code and its error lines (no traceback allowed)."""
    from sane_ray.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("sane-ray: error:")]


def test_two_concurrent_make_zoo_one_is_refused(ray_cluster, tmp_path, capsys):
    """The first writer is another process (its own local cluster), as two users' runs would be."""
    import sys

    from sane_ray.zoo.reader import open_zoo

    out = str(tmp_path / "zoo")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen([sys.executable, "-m", "sane_ray.cli", "make-zoo", "--out", out, *ZOO], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not storage.exists(os.path.join(out, lease.LEASE_FILE)):
            assert first.poll() is None, f"the first writer ended before taking its lease: {first.stderr.read()}"
            assert time.monotonic() < deadline, "the first writer took no lease in 300 s"
            time.sleep(0.1)
        code, lines = _cli(["make-zoo", "--out", out, *ZOO], capsys)
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 2 and len(lines) == 1
    assert f"{out} is being written by make-zoo on host {socket.gethostname()} pid {first.pid} since" in lines[0]
    zoo = open_zoo(out, verify=True)  # the winner's zoo is whole
    assert len(zoo.models) == 2 and not zoo.skipped
    assert not os.path.exists(os.path.join(out, lease.LEASE_FILE))

    code, lines = _cli(["make-zoo", "--out", out, *ZOO], capsys)  # ZooExistsError
    assert code == 2 and len(lines) == 1 and out in lines[0] and "overwrite=true" in lines[0]


def _check(zoo: str, capsys) -> tuple[int, list[str]]:
    """``sane-ray zoo info --check``: exit code and stripped output lines."""
    from sane_ray.cli import main

    capsys.readouterr()
    code = main(["zoo", "info", zoo, "--check", "--no-verify"])
    return code, [line.strip() for line in capsys.readouterr().out.splitlines()]


def test_interrupted_overwrites_keep_the_old_zoo_and_leave_no_orphans(ray_cluster, tmp_path, monkeypatch, capsys):
    """Each prefix in turn: an overwrite interrupted before publishing keeps the old zoo; the next
    successful one leaves only the files its manifest names, whichever prefix the interrupted one used."""
    from sane_ray.zoo import generate
    from sane_ray.zoo.generate import generate_zoo
    from sane_ray.zoo.plan import ZooGenConfig
    from sane_ray.zoo.native import manifest_paths
    from sane_ray.zoo.reader import open_zoo

    out = str(tmp_path / "zoo")
    published = ZooGenConfig(out=out, models=2, epochs=0, seed=3)
    generate_zoo(published, progress=False)

    def interrupted(*args, **kwargs):  # Ctrl-C after every new checkpoint is written, before publishing
        raise KeyboardInterrupt

    for prefix, seed in (("next", 4), ("models", 5)):
        # 2 models, the next zoo 1: the interrupted writer's model_0001 is no one's
        with monkeypatch.context() as m:
            m.setattr(generate, "publish_manifest", interrupted)
            with pytest.raises(KeyboardInterrupt):
                generate_zoo(ZooGenConfig(out=out, models=2, epochs=0, seed=seed, overwrite=True), progress=False)
        left = os.path.join(out, *(["next"] if prefix == "next" else []), "models", "model_0001")
        assert os.path.isdir(left)  # the new one was written beside the old
        zoo = open_zoo(out, verify=True)
        assert zoo.metadata["generation"] == published.identity() and not os.path.exists(os.path.join(out, lease.LEASE_FILE))
        code, listed = _check(out, capsys)
        assert code == 1 and f"{os.path.relpath(left, out)}/epoch_0000.safetensors" in listed

        published = ZooGenConfig(out=out, models=1, epochs=0, seed=seed + 10, overwrite=True)
        generate_zoo(published, progress=False)
        zoo = open_zoo(out, verify=True)
        assert zoo.metadata["generation"] == published.identity() and len(zoo.models) == 1
        paths = manifest_paths(out)
        assert all(p.startswith(f"{prefix}/") for p in paths)
        assert storage.find(out) == sorted(paths + ["manifest.parquet"])  # the old zoo and the orphans went
        assert sorted(os.listdir(out)) == sorted(["manifest.parquet", prefix])  # no empty directories either
        code, listed = _check(out, capsys)
        assert code == 0 and "unlisted:     0 file(s) under the zoo that its manifest does not name" in listed


def test_failed_zoo_generation_is_one_line_exit_1(ray_cluster, tmp_path, capsys):
    out = tmp_path / "zoo"
    blocker = out / "models" / "model_0001" / "epoch_0001.safetensors"  # a directory: the write fails
    blocker.mkdir(parents=True)
    code, lines = _cli(["make-zoo", "--out", str(out), *ZOO], capsys)
    assert code == 1 and len(lines) == 1
    assert "training model_0001 failed" in lines[0] and f"no manifest published at {out}" in lines[0]


def test_wrong_s3_credentials_on_write_name_the_uri(s3, monkeypatch, capsys):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials from now on
    out = f"s3://{s3['bucket']}/zoo"
    code, lines = _cli(["make-zoo", "--out", out, *ZOO], capsys)
    assert code == 2 and len(lines) == 1
    assert f"{out}/{lease.LEASE_FILE}" in lines[0]


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail where Ray would start: what the test runs must refuse before it."""
    import ray

    def no_cluster(*args, **kwargs):
        raise AssertionError("a local cluster was started")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)


def test_more_workers_than_cores_refused_before_a_local_cluster(no_ray, capsys):
    code, lines = _cli(["pretrain", "--workers", "4096"], capsys)
    assert code == 2 and len(lines) == 1
    assert (f"4096 workers x at least 0.25 CPU plus 0.5 CPU for the data stream need 1024.5 CPU, but this machine "
            f"(no RAY_ADDRESS) has {os.cpu_count()}") in lines[0]
    with pytest.raises(ValueError, match=r"9 workers x 1 CPU .* need 9.5 CPU, but a local cluster of run.local_cpus=8"):
        cluster.ensure_ray_for(cluster.RunSettings(workers=9, cpus_per_worker=1, local_cpus=8), DataConfig())


@pytest.mark.parametrize("case", ["same run name", "ftp out", "missing zoo", "no usable checkpoint"])
def test_a_run_that_cannot_go_anywhere_is_refused_in_seconds_before_ray_starts(case, tmp_path, no_ray, capsys):
    import zoo_builders as zb

    zoo, out = str(tmp_path / "zoo"), str(tmp_path / "runs")
    zb.build_native_zoo(zoo, n_models=2)
    run = os.path.join(out, "r")
    argv = {"zoo": zoo, "out": out}
    holder = None
    if case == "same run name":
        holder = lease.acquire(run, "pretraining")  # a live writer (this process) holds the run directory
        want = f"{run} is being written by pretraining on host {socket.gethostname()} pid {os.getpid()} since"
    elif case == "ftp out":
        argv["out"], want = "ftp://x", "unsupported storage scheme 'ftp' in 'ftp://x' (use a path or s3://)"
    elif case == "missing zoo":
        argv["zoo"], want = str(tmp_path / "nope"), f"no zoo at {tmp_path / 'nope'}: it does not exist"
    else:  # an upload that never finished: no checksums
        os.makedirs(os.path.join(run, "checkpoint_2026-01-01_00-00-01.000000"))
        want = f"no usable checkpoint in {run}: {run}/checkpoint_2026-01-01_00-00-01.000000: no checksums"
    start = time.monotonic()
    try:
        code, lines = _cli(["pretrain", "--zoo", argv["zoo"], "--out", argv["out"], "--name", "r"], capsys)
    finally:
        if holder is not None:
            holder.release()
    elapsed = time.monotonic() - start
    assert code == 2 and len(lines) == 1 and want in lines[0], lines
    assert elapsed < 10, f"refused after {elapsed:.1f} s"
    assert not os.path.exists(os.path.join(run, lease.LEASE_FILE))


@pytest.mark.timeout(600)
def test_a_killed_worker_is_one_console_line_and_its_traceback_is_in_the_run_log(tmp_path):
    """A real run in its own process and local cluster (Ray streams every worker's output to the
    driver, as for a user); rank 1's process is SIGKILLed once after epoch 1 and the run restarts."""
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    script = os.path.join(os.path.dirname(__file__), "kill_worker_run.py")
    done = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=540)
    console = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0 and "finished" in console, "\n".join(console[-30:])
    # Ray streams each process's output on its own, so the controller's fault line may reach the
    # console after the new workers' lines: it is looked for anywhere, once.
    shown = "\n".join(console[-30:])
    deaths = [line for line in console if line.startswith("sane-ray: rank ")]
    assert len(deaths) == 1, shown
    assert deaths[0].startswith("sane-ray: rank 1: its process (pid ") and " died on node " in deaths[0], shown
    assert deaths[0].endswith("restarting from the newest checkpoint, restart 1 of 1"), shown
    assert sum(f"resuming {tmp_path}/run after epoch 1 from checkpoint_" in line for line in console) == 1, shown
    epochs = [i for i, line in enumerate(console) if "epoch 1/2 |" in line or "epoch 2/2 |" in line]
    assert len(console[epochs[0] + 1:epochs[-1]]) <= 5, shown  # no flood between the fault and the next epoch
    assert not any("Traceback" in line or "Error" in line for line in console if not line.startswith("sane-ray:"))
    (log,) = os.listdir(os.path.join(tmp_path, "run", "logs"))
    text = open(os.path.join(tmp_path, "run", "logs", log)).read()
    assert "Traceback (most recent call last)" in text and "ActorDiedError" in text


@pytest.mark.parametrize("error,code", [
    (ResumeError("no usable checkpoint in /runs/x: /runs/x/checkpoint_1/__0_0.distcp: missing"), 2),
    (IntegrityError("/runs/x/model.safetensors: 10 bytes, 99 recorded (truncated or overwritten)"), 2),
    (lease.LeaseHeldError("/runs/x is being written by pretraining on host h pid 1 since ..."), 2),
    (storage.StorageError("cannot write s3://b/runs/x/model.safetensors: Access Denied"), 2),
    (PretrainingFailedError("pretraining into /runs/x failed after 3 restart(s) (train.max_failures): rank 0: "
                            "RuntimeError: boom; its checkpoints are kept, rerun to resume\nTraceback (most recent"), 1),
])
def test_each_fault_reaches_the_user_as_one_line(monkeypatch, capsys, error, code):
    from sane_ray import pretrain
    from sane_ray.cli import main

    def fail(cfg):
        raise error

    monkeypatch.setattr(pretrain, "run_pretrain", fail)
    got, lines = _cli(["pretrain"], capsys)
    assert got == code and lines == [f"sane-ray: error: {str(error).splitlines()[0]}"]
    with pytest.raises(type(error)):  # -v: the traceback
        main(["-v", "pretrain"])
