"""Per-file SHA-256 digests for a directory that is published as a whole.

A training checkpoint or an exported model is several files; a reader must trust it
only if every file is there, complete and unaltered. The writer records each file's
size and digest in :data:`DIGEST_FILE`, written *last*; :func:`verify_digests` then
tells a truncated, missing or altered file from an intact one, and names it.
Works on any storage URI (local paths for checkpoints before upload, ``s3://`` after).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Iterable, Mapping

from sane_ray import storage

DIGEST_FILE = "checksums.json"


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


def verify_digests(uri: str, digest_file: str = DIGEST_FILE, s3: storage.S3Options | None = None) -> dict[str, bytes]:
    """Check every file recorded in ``uri/digest_file``; returns their bytes, or raises :class:`IntegrityError`.

    The message names the first bad file and what is wrong with it (missing, truncated
    or grown, altered), or the missing/unreadable digest file itself.
    """
    digest_uri = storage.join(uri, digest_file)
    try:
        entries = json.loads(storage.read_bytes(digest_uri, s3))["files"]
    except storage.StorageError as e:
        raise IntegrityError(f"{digest_uri}: no checksums ({e})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{digest_uri}: unreadable checksums ({e})") from e
    contents = {}
    for name, want in sorted(entries.items()):
        file_uri = storage.join(uri, name)
        try:
            data = storage.read_bytes(file_uri, s3)
        except storage.StorageError as e:
            raise IntegrityError(f"{file_uri}: missing or unreadable ({e})") from e
        if len(data) != want["size"]:
            raise IntegrityError(f"{file_uri}: {len(data)} bytes, {want['size']} recorded (truncated or overwritten)")
        if digest(data) != want["sha256"]:
            raise IntegrityError(f"{file_uri}: content differs from its recorded SHA-256 (altered)")
        contents[name] = data
    return contents
