"""One place that turns a URI into a filesystem.

Zoos, preprocessed data, checkpoints and results all live under URIs: a local path
(the default), ``file://...`` or ``s3://bucket/prefix``. Everything else in sane-ray
goes through :func:`open_uri` (fsspec, for our own reads and writes) or
:func:`pyarrow_fs` (for Ray Data and Ray Train, which want a pyarrow filesystem), so
S3 endpoints and credentials are resolved identically everywhere.

S3 settings come from :class:`S3Options`, which defaults to the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``/``AWS_REGION``). On S3 the pyarrow
filesystem wraps the same s3fs filesystem, so both resolve settings identically.

Requests retry with exponential backoff (capped at 20 s) and each connection attempt
and request is bounded (:class:`S3Options` ``retries``, ``connect_timeout_s``,
``request_timeout_s``); the defaults ride out an endpoint that is down for about a
minute (a refused endpoint is given up after ~85 s). Ray Data and Ray Train's own
writes go through :func:`pyarrow_fs`, so they are covered too.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
from aiohttp import ClientError
from botocore.exceptions import BotoCoreError

# What a failed storage call raises: fsspec maps S3 answers to OSErrors, but a connection
# that closes before an answer, or mid-body, surfaces as botocore's or aiohttp's own error
# once s3fs's retries are spent.
FAILURES = (OSError, BotoCoreError, ClientError)


def cache_dir() -> str:
    """sane-ray's local cache root: ``$SANE_RAY_CACHE`` or ``~/.cache/sane-ray``."""
    return os.path.expanduser(os.environ.get("SANE_RAY_CACHE") or "~/.cache/sane-ray")


class StorageError(OSError):
    """A storage location is missing, unreadable or unwritable (the message names it)."""


class NotFoundError(StorageError, FileNotFoundError):
    """The storage answered that the object does not exist: a fact, unlike a timeout or a refusal."""


@dataclass(frozen=True)
class S3Options:
    """S3 connection settings; unset fields fall back to the AWS environment variables.

    ``retries`` is the number of attempts per request (exponential backoff between them,
    capped at 20 s); the timeouts bound one attempt. The secret key and session token
    never appear in ``repr``.
    """

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None
    retries: int = 12
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0

    def resolved(self) -> "S3Options":
        env = os.environ.get
        return dataclasses.replace(
            self,
            endpoint_url=self.endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            access_key=self.access_key or env("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env("AWS_SECRET_ACCESS_KEY"),
            session_token=self.session_token or env("AWS_SESSION_TOKEN"),
            region=self.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
        )

    def env_vars(self) -> dict[str, str]:
        """The settings as AWS variables, to hand to Ray workers through a runtime env."""
        r = self.resolved()
        pairs = {
            "AWS_ENDPOINT_URL": r.endpoint_url,
            "AWS_ACCESS_KEY_ID": r.access_key,
            "AWS_SECRET_ACCESS_KEY": r.secret_key,
            "AWS_SESSION_TOKEN": r.session_token,
            "AWS_DEFAULT_REGION": r.region,
        }
        return {k: v for k, v in pairs.items() if v}


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``"file"`` or ``"s3"``; ``path`` has no scheme."""

    scheme: str
    path: str
    s3: S3Options = field(default_factory=S3Options)

    @property
    def uri(self) -> str:
        return self.path if self.scheme == "file" else f"s3://{self.path}"


def parse_uri(uri: str | os.PathLike, s3: S3Options | None = None) -> Location:
    """Split a URI into scheme and path; local paths become absolute."""
    text = os.fspath(uri)
    if not text:
        raise StorageError("empty storage URI")
    parsed = urlparse(text)
    if parsed.scheme in ("s3", "s3a"):
        path = (parsed.netloc + parsed.path).rstrip("/")
        if not parsed.netloc:
            raise StorageError(f"S3 URI without a bucket: {text!r}")
        return Location("s3", path, s3 or S3Options())
    if parsed.scheme == "file":
        return Location("file", os.path.abspath(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # a Windows drive letter is not a scheme
        raise StorageError(f"unsupported storage scheme {parsed.scheme!r} in {text!r} (use a path or s3://)")
    return Location("file", os.path.abspath(os.path.expanduser(text)))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (keeps the scheme)."""
    text = os.fspath(uri).rstrip("/")
    return posixpath.join(text, *parts)


def open_uri(uri: str | os.PathLike, s3: S3Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the scheme-less path for ``uri``."""
    loc = parse_uri(uri, s3)
    if loc.scheme == "file":
        return fsspec.filesystem("file"), loc.path
    return _s3fs(loc.s3.resolved()), loc.path


def pyarrow_fs(uri: str | os.PathLike, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the scheme-less path for ``uri`` (for Ray Data / Train)."""
    loc = parse_uri(uri, s3)
    if loc.scheme == "file":
        return pafs.LocalFileSystem(), loc.path
    # pyarrow's own S3FileSystem drops its retry strategy when pickled (as Ray does to ship
    # it to workers), falling back to 3 attempts; s3fs keeps its settings, so Ray Data and
    # Ray Train get the same retries and timeouts as our own reads and writes.
    return pafs.PyFileSystem(pafs.FSSpecHandler(_s3fs(loc.s3.resolved()))), loc.path


def _s3fs(o: S3Options) -> fsspec.AbstractFileSystem:
    client_kwargs: dict[str, Any] = {}
    if o.endpoint_url:
        client_kwargs["endpoint_url"] = o.endpoint_url
    if o.region:
        client_kwargs["region_name"] = o.region
    # Listings are not cached: a zoo written a moment ago by another process must be visible.
    return fsspec.filesystem(
        "s3",
        key=o.access_key,
        secret=o.secret_key,
        token=o.session_token,
        client_kwargs=client_kwargs,
        config_kwargs={
            "connect_timeout": o.connect_timeout_s,
            "read_timeout": o.request_timeout_s,
            # Exponential backoff capped at 20 s ("legacy" mode's is uncapped).
            "retries": {"max_attempts": o.retries, "mode": "standard"},
        },
        use_listings_cache=False,
    )


def exists(uri: str, s3: S3Options | None = None) -> bool:
    fs, path = open_uri(uri, s3)
    try:
        return fs.exists(path)
    except FAILURES as e:
        raise StorageError(f"cannot check {uri}: {e}") from e


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    """Read a whole object; a missing or unreadable one raises :class:`StorageError` naming it."""
    fs, path = open_uri(uri, s3)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise NotFoundError(f"not found: {uri}") from e
    except FAILURES as e:
        raise StorageError(f"cannot read {uri}: {e}") from e


def read_whole(uri: str, s3: S3Options | None = None) -> bytes:
    """:func:`read_bytes`, then proof that the read was complete: as many bytes as the storage says it holds.

    A short read (a connection cut mid-body) raises :class:`StorageError`, so callers can
    tell a file that really is truncated from one that was not read to its end.
    """
    data = read_bytes(uri, s3)
    fs, path = open_uri(uri, s3)
    try:
        size = fs.size(path)
    except FileNotFoundError as e:
        raise NotFoundError(f"not found: {uri} (removed while it was read)") from e
    except FAILURES as e:
        raise StorageError(f"cannot stat {uri}: {e}") from e
    if size != len(data):
        raise StorageError(f"incomplete read of {uri}: {len(data)} of {size} bytes")
    return data


def write_bytes_atomic(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write an object so readers see either nothing or all of it.

    Locally: write a temporary file beside the target, fsync, then rename over it.
    On S3 a single PUT is already all-or-nothing.
    """
    fs, path = open_uri(uri, s3)
    loc = parse_uri(uri, s3)
    try:
        if loc.scheme == "s3":
            fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except FAILURES as e:
        if isinstance(e, StorageError):
            raise
        raise StorageError(f"cannot write {uri}: {e}") from e


def makedirs(uri: str, s3: S3Options | None = None) -> None:
    """Create a directory (no-op on object stores, whose prefixes need no creation)."""
    loc = parse_uri(uri, s3)
    if loc.scheme == "file":
        try:
            os.makedirs(loc.path, exist_ok=True)
        except FAILURES as e:
            raise StorageError(f"cannot create {uri}: {e}") from e


def remove(uri: str, s3: S3Options | None = None) -> None:
    """Remove a file or a whole directory tree; a missing one is not an error."""
    fs, path = open_uri(uri, s3)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except FAILURES as e:
        raise StorageError(f"cannot remove {uri}: {e}") from e


def find(uri: str, s3: S3Options | None = None, dirs: bool = False) -> list[str]:
    """Paths (relative to ``uri``) of every file under ``uri``, sorted; none if it does not exist.

    With ``dirs``, directories too (on S3: the prefixes that hold objects), from the same one
    recursive listing: what a zoo reader needs to see a model's layout without opening a file.
    """
    fs, path = open_uri(uri, s3)
    try:
        found = fs.find(path, withdirs=dirs)
    except FileNotFoundError:
        return []
    except FAILURES as e:
        raise StorageError(f"cannot list {uri}: {e}") from e
    return sorted({posixpath.relpath(p.rstrip("/"), path) for p in found} - {"."})


def remove_files(uri: str, names: list[str], s3: S3Options | None = None) -> None:
    """Remove the files ``names`` (relative to ``uri``) in one call; locally also the directories left empty."""
    if not names:
        return
    fs, path = open_uri(uri, s3)
    paths = [posixpath.join(path, n) for n in names]
    try:
        fs.rm(paths)
    except FAILURES as e:
        raise StorageError(f"cannot remove {len(paths)} file(s) under {uri}: {e}") from e
    if parse_uri(uri, s3).scheme == "file":
        parents = {os.path.dirname(p) for p in paths}
        for d in sorted(parents, key=len, reverse=True):  # deepest first
            while d != path and d.startswith(path) and os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
                d = os.path.dirname(d)


def listdir(uri: str, s3: S3Options | None = None) -> list[str]:
    """Names (not paths) of the entries directly under ``uri``, sorted."""
    fs, path = open_uri(uri, s3)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError as e:
        raise NotFoundError(f"not found: {uri}") from e
    except FAILURES as e:
        raise StorageError(f"cannot list {uri}: {e}") from e
    return sorted(posixpath.basename(p.rstrip("/")) for p in entries)
