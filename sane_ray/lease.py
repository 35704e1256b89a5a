"""One writer at a time: a lease file claims a storage location while it is written.

Every location a job writes (a zoo being generated, a run directory, a sweep, a probe's
or sampling job's output, a canonical zoo being built) gets a lease at
``<location>/.sane-ray-lease.json`` naming its holder (host, pid, purpose, start and
heartbeat times). It is created atomically where the storage allows it:

- locally, the full file is written under a temporary name and hard-linked into place
  (``os.link`` fails if the lease exists, so exactly one writer wins);
- on S3, a conditional PUT (``If-None-Match: *``) creates it only if absent; heartbeats
  and take-overs are conditional on the ETag the writer last saw (``If-Match``).

A second writer is refused with :class:`LeaseHeldError`, naming the holder. A lease is
stale when its holder's process is gone (same host) or it has not been renewed for
``stale_after_s``; a new writer then takes it over and says so. Locally the take-over
renames the stale file away first; two writers taking over the *same* stale lease
within milliseconds could both succeed there (documented race window; S3's ETag
condition has none).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sane_ray import storage

log = logging.getLogger(__name__)

LEASE_FILE = ".sane-ray-lease.json"
HEARTBEAT_S = 20.0
STALE_AFTER_S = 120.0


class LeaseHeldError(RuntimeError):
    """Another writer holds the location (the message names it and since when)."""


@dataclass
class Lease:
    """A held lease; :meth:`release` (or leaving the ``with`` block) gives it up."""

    uri: str
    holder: dict[str, Any]
    s3: storage.S3Options | None = None
    heartbeat_s: float = HEARTBEAT_S
    etag: str | None = None  # S3 only: the lease object's version we wrote last
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="sane-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = _read(self.uri, self.s3)
                if current is None or current[0].get("token") != self.holder["token"]:
                    log.error("lost the lease %s to %s; stop this writer", self.uri, _describe(current and current[0]))
                    return
                self.holder["heartbeat"] = time.time()
                self.etag = _write(self.uri, self.holder, self.s3, if_match=self.etag)
            except Exception as e:  # an outage must not end the writer: the next beat retries
                log.warning("could not renew the lease %s: %s", self.uri, e)

    def release(self) -> None:
        self._stop.set()
        try:
            current = _read(self.uri, self.s3)
            if current is not None and current[0].get("token") == self.holder["token"]:
                storage.remove(self.uri, self.s3)
        except storage.StorageError as e:
            log.warning("could not release the lease %s: %s", self.uri, e)


def acquire(
    location: str,
    purpose: str,
    s3: storage.S3Options | None = None,
    stale_after_s: float = STALE_AFTER_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> Lease:
    """Claim ``location`` for ``purpose`` or raise :class:`LeaseHeldError` naming the holder."""
    uri = storage.join(storage.parse_uri(location, s3).uri, LEASE_FILE)
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
              "started": now, "heartbeat": now, "token": uuid.uuid4().hex}
    etag = _create(uri, holder, s3)
    if etag is False:
        current = _read(uri, s3)
        if current is None:  # released in between: one more try
            etag = _create(uri, holder, s3)
        elif _stale(current[0], stale_after_s):
            log.warning("taking over the stale lease on %s from %s", location, _describe(current[0]))
            etag = _take_over(uri, holder, current, s3)
        if etag is False:
            current = _read(uri, s3)
            raise LeaseHeldError(
                f"{location} is being written by {_describe(current and current[0])} (lease {uri}); "
                f"wait for it to finish, or remove the lease if that writer is gone"
            )
    lease = Lease(uri, holder, s3, heartbeat_s, etag if isinstance(etag, str) else None)
    lease.start_heartbeat()
    return lease


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another writer"
    started = datetime.fromtimestamp(holder.get("started", 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    age = time.time() - holder.get("heartbeat", 0)
    return (f"{holder.get('purpose', '?')} on host {holder.get('host', '?')} pid {holder.get('pid', '?')} "
            f"since {started} (last heartbeat {age:.0f} s ago)")


def _stale(holder: dict[str, Any], stale_after_s: float) -> bool:
    if time.time() - float(holder.get("heartbeat", 0)) > stale_after_s:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
    return False


def _read(uri: str, s3: storage.S3Options | None) -> tuple[dict[str, Any], str | None] | None:
    """The lease's content and (on S3) ETag, or None if there is none."""
    fs, path = storage.open_uri(uri, s3)
    try:
        if storage.parse_uri(uri, s3).scheme == "s3":
            etag = fs.info(path).get("ETag")
            return json.loads(fs.cat_file(path)), etag
        with open(path, "rb") as f:
            return json.loads(f.read() or b"{}"), None
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable: treat as held by an unknown writer, stale once old enough
        return {"heartbeat": 0.0}, None
    except OSError as e:
        raise storage.StorageError(f"cannot read the lease {uri}: {e}") from e


def _create(uri: str, holder: dict[str, Any], s3: storage.S3Options | None) -> str | bool:
    """Create the lease if absent: its ETag on S3 (True locally), False if it exists."""
    body = json.dumps(holder).encode()
    fs, path = storage.open_uri(uri, s3)
    if storage.parse_uri(uri, s3).scheme == "s3":
        try:
            return fs.pipe_file(path, body, mode="create")["ETag"]
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise storage.StorageError(f"cannot create the lease {uri}: {e}") from e
    tmp = f"{path}.{holder['token']}"
    try:  # the job's first write there: an unwritable location fails here, before Ray starts
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise storage.StorageError(f"cannot create the lease {uri}: {e}") from e
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def _write(uri: str, holder: dict[str, Any], s3: storage.S3Options | None, if_match: str | None) -> str | None:
    """Renew the lease we hold (on S3 only if it is still the version we wrote)."""
    body = json.dumps(holder).encode()
    if storage.parse_uri(uri, s3).scheme == "s3":
        fs, path = storage.open_uri(uri, s3)
        kwargs = {"IfMatch": if_match} if if_match else {}
        return fs.pipe_file(path, body, **kwargs)["ETag"]
    storage.write_bytes_atomic(uri, body, s3)
    return None


def _take_over(uri: str, holder: dict[str, Any], current: tuple[dict[str, Any], str | None],
               s3: storage.S3Options | None) -> str | bool:
    """Replace a stale lease with ours; False if another writer got there first."""
    _, etag = current
    if storage.parse_uri(uri, s3).scheme == "s3":
        try:
            return _write(uri, holder, s3, if_match=etag or "*")
        except OSError:
            return False
    path = storage.parse_uri(uri, s3).path
    grave = f"{path}.stale-{holder['token']}"
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return _create(uri, holder, s3)
    os.remove(grave)
    return _create(uri, holder, s3)
