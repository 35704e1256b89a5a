"""Which checkpoint a run continues from, and which checkpoint directories it keeps.

Ray Train resumes from the latest checkpoint it *registered*, which lags what is on
storage after a crash or Ctrl-C, and it never checks the files. This module owns that
decision instead: a run continues from the newest checkpoint directory in its run
directory that verifies (:func:`~sane_ray.train.checkpoint.verify_checkpoint`); newer
ones that fail are reported, with the reason, and removed; only the newest
``checkpoints_to_keep`` directories are kept, whoever wrote them. Ray's own
``num_to_keep`` is off, so deleting has one owner.

Nothing is deleted on doubt: a checkpoint fails only on proof (a file the storage says
is absent, or a complete read that differs from its digest). A storage error while
verifying (after retries) stops the resume with :class:`ResumeStorageError`, naming
what could not be read, and leaves every checkpoint where it is.

The driver calls :func:`preflight` before ``fit()`` (a run whose checkpoints are all
unusable stops there, in one line); every worker start, also after an in-fit restart
where only the workers run, calls :func:`restore`; rank 0 calls :func:`prune` after
each checkpoint.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch.distributed as dist

from sane_ray import storage
from sane_ray.checksums import IntegrityError
from sane_ray.train.checkpoint import TrainState, load_train_state, verify_checkpoint

# Ray Train's registry of reported checkpoints in the run directory (ray.train.v2 constants).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Ray names checkpoint directories by their report time, so names sort oldest first.
_CHECKPOINT_DIR = re.compile(r"checkpoint_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(\.\d+)?")


class ResumeError(ValueError):
    """A run directory holds checkpoints but none of them can be loaded."""


class ResumeStorageError(storage.StorageError):
    """The checkpoints could not be read to decide which to resume from; nothing was deleted."""


@dataclass
class Found:
    """The newest usable checkpoint (``name`` None: there is none) and the newer ones that failed."""

    name: str | None
    contents: dict[str, bytes] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # directory name -> why it is unusable


def checkpoint_dirs(run_uri: str, s3: storage.S3Options | None = None) -> list[str]:
    """Names of the checkpoint directories in a run directory, oldest first (none if it does not exist)."""
    if not storage.exists(run_uri, s3):
        return []
    return sorted(n for n in storage.listdir(run_uri, s3) if _CHECKPOINT_DIR.fullmatch(n))


def find_usable(run_uri: str, s3: storage.S3Options | None = None) -> Found:
    """Verify checkpoints newest first; the first intact one wins.

    Raises :class:`ResumeError` if all fail, :class:`ResumeStorageError` if one could not be read.
    """
    found = Found(None)
    names = checkpoint_dirs(run_uri, s3)
    for name in reversed(names):
        try:
            found.contents = verify_checkpoint(storage.join(run_uri, name), s3)
        except IntegrityError as e:
            found.failed[name] = str(e)
            continue
        except storage.StorageError as e:
            raise ResumeStorageError(
                f"cannot resume {run_uri}: checkpoint {name} could not be read ({_first_line(e)}); "
                "nothing was deleted, rerun once the storage answers"
            ) from e
        found.name = name
        return found
    if names:
        raise ResumeError(
            f"no usable checkpoint in {run_uri}: " + "; ".join(found.failed.values())
            + " (remove the run directory or pick another run.name to start over)"
        )
    return found


def preflight(run_uri: str, s3: storage.S3Options | None = None) -> None:
    """Before ``fit()``: fail fast if no checkpoint is usable, and drop Ray's registry of checkpoints.

    Ray refuses to start when its registry names a directory that is gone (removed by
    :func:`prune`), and the workers choose the checkpoint themselves, so the registry is
    removed rather than trusted.
    """
    find_usable(run_uri, s3)
    snapshot = storage.join(run_uri, RAY_SNAPSHOT)
    if storage.exists(snapshot, s3):
        storage.remove(snapshot, s3)


def restore(state: TrainState, run_uri: str | None, keep: int, s3: storage.S3Options | None = None) -> None:
    """Load the newest usable checkpoint of ``run_uri`` into ``state`` on every rank (a collective).

    Rank 0 chooses, says in one line what it resumes from and why newer checkpoints were
    skipped, and removes the unusable ones; the other ranks load the same directory.
    """
    if run_uri is None:
        return
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    found, error = Found(None), None
    if rank == 0:
        try:
            found = find_usable(run_uri, s3)
        except (ResumeError, ResumeStorageError) as e:  # every rank raises it, none waits for rank 0
            error = e
    choice = [found.name, error]
    if distributed:
        dist.broadcast_object_list(choice, src=0)
    name, error = choice
    if error is not None:
        raise error
    if name is None:
        return
    uri = storage.join(run_uri, name)
    contents = found.contents if rank == 0 else verify_checkpoint(uri, s3)
    with _local_directory(uri, contents, s3) as directory:
        load_train_state(state, directory)
    if rank == 0:
        line = f"resuming {run_uri} after epoch {state.epoch} from {name}"
        if found.failed:
            line += f"; skipped {len(found.failed)} newer: " + "; ".join(found.failed.values())
        sys.stdout.write(line + "\n")  # Ray Train's patched print() would log it twice
        sys.stdout.flush()
        prune(run_uri, keep, s3, remove=found.failed)


def prune(run_uri: str, keep: int, s3: storage.S3Options | None = None, remove: Iterable[str] = ()) -> list[str]:
    """Remove the checkpoint directories in ``remove`` and all but the newest ``keep`` others; returns the removed."""
    remove = set(remove)
    names = [n for n in checkpoint_dirs(run_uri, s3) if n not in remove]
    doomed = sorted(remove) + names[:-keep]
    for name in doomed:
        storage.remove(storage.join(run_uri, name), s3)
    return doomed


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@contextlib.contextmanager
def _local_directory(uri: str, contents: dict[str, bytes], s3: storage.S3Options | None) -> Iterator[str]:
    """A local directory holding the verified ``contents`` of ``uri`` (the directory itself when local)."""
    loc = storage.parse_uri(uri, s3)
    if loc.scheme == "file":
        yield loc.path
        return
    directory = tempfile.mkdtemp(prefix="sane-resume-")
    try:
        for name, data in contents.items():
            with open(f"{directory}/{name}", "wb") as f:
                f.write(data)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
