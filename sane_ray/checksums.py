"""Per-file SHA-256 digests for a directory that is published as a whole.

A training checkpoint or an exported model is several files; a reader must trust it
only if every file is there, complete and unaltered. The writer records each file's
size and digest in :data:`DIGEST_FILE`, written *last*; :func:`verify_digests` then
tells a truncated, missing or altered file from an intact one, and names it.
Works on any storage URI (local paths for checkpoints before upload, ``s3://`` after).

Only proof makes a directory bad: a file the storage says does not exist, or a complete
read (as many bytes as the storage holds) whose size or digest differs from the record.
Any other storage error (timeout, refused connection, throttling, permission) says
nothing about the files: it is retried and then raised as
:class:`~sane_ray.storage.StorageError`, never as :class:`IntegrityError`, so that no
caller deletes a good checkpoint because the network blinked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from typing import Iterable, Mapping

from sane_ray import storage

DIGEST_FILE = "checksums.json"
# Attempts of one verifying read (each already retried by the S3 client), and the first pause between them.
READ_ATTEMPTS = 3
READ_BACKOFF_S = 1.0

log = logging.getLogger(__name__)


class IntegrityError(ValueError):
    """A published directory whose files do not match their recorded digests."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_digests(
    uri: str, names: Iterable[str], known: Mapping[str, bytes] | None = None, digest_file: str = DIGEST_FILE
) -> dict[str, dict]:
    """Record size and SHA-256 of ``names`` (relative paths under ``uri``) in ``digest_file``.

    ``known`` passes bytes the caller already holds, so they are not read back. Writers
    whose files are merged into one directory (the ranks of a checkpoint) each pass
    their own ``digest_file`` name. Returns the recorded entries.
    """
    known = known or {}
    entries = {}
    for name in sorted(set(names) - {digest_file}):
        data = known[name] if name in known else storage.read_bytes(storage.join(uri, name))
        entries[name] = {"size": len(data), "sha256": digest(data)}
    body = json.dumps({"format": 1, "files": entries}, indent=1, sort_keys=True).encode()
    storage.write_bytes_atomic(storage.join(uri, digest_file), body)
    return entries


def local_files(directory: str) -> list[str]:
    """Relative paths of every file under a local directory (for :func:`write_digests`)."""
    out = []
    for root, _, files in os.walk(directory):
        for f in files:
            out.append(posixpath.relpath(os.path.join(root, f).replace(os.sep, "/"), directory.replace(os.sep, "/")))
    return sorted(out)


def read_verifiable(uri: str, s3: storage.S3Options | None = None) -> bytes:
    """The whole object at ``uri``, read completely (:func:`~sane_ray.storage.read_whole`).

    A storage error other than "not found" is retried ``READ_ATTEMPTS`` times with
    doubling pauses, then raised; :class:`~sane_ray.storage.NotFoundError` is raised at once.
    """
    attempt = 1
    while True:
        try:
            return storage.read_whole(uri, s3)
        except storage.NotFoundError:
            raise
        except storage.StorageError as e:
            if attempt == READ_ATTEMPTS:
                raise
            pause = READ_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s; retrying in %.0f s", e, pause)
            time.sleep(pause)
            attempt += 1


def verify_digests(uri: str, digest_file: str = DIGEST_FILE, s3: storage.S3Options | None = None) -> dict[str, bytes]:
    """Check every file recorded in ``uri/digest_file``; returns their bytes, or raises :class:`IntegrityError`.

    The message names the first bad file and what is wrong with it (missing, truncated
    or grown, altered), or the missing/unreadable digest file itself. A file that could
    not be read (after retries) raises :class:`~sane_ray.storage.StorageError` instead.
    """
    digest_uri = storage.join(uri, digest_file)
    try:
        entries = json.loads(read_verifiable(digest_uri, s3))["files"]
    except storage.NotFoundError as e:
        raise IntegrityError(f"{digest_uri}: no checksums ({e})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{digest_uri}: unreadable checksums ({e})") from e
    contents = {}
    for name, want in sorted(entries.items()):
        file_uri = storage.join(uri, name)
        try:
            data = read_verifiable(file_uri, s3)
        except storage.NotFoundError as e:
            raise IntegrityError(f"{file_uri}: missing ({e})") from e
        if len(data) != want["size"]:
            raise IntegrityError(f"{file_uri}: {len(data)} bytes, {want['size']} recorded (truncated or overwritten)")
        if digest(data) != want["sha256"]:
            raise IntegrityError(f"{file_uri}: content differs from its recorded SHA-256 (altered)")
        contents[name] = data
    return contents
