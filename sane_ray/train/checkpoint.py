"""Checkpoints with torch.distributed.checkpoint (DCP).

Every rank writes only its own shards into a directory (plus rank 0 the metadata);
Ray Train merges the ranks' directories into one checkpoint. Loading reshards, so a
checkpoint can be resumed with another number of workers. Without a process group
(a single process) the same calls write an unsharded checkpoint.

Each rank also records the size and SHA-256 of the files it wrote in
``checksums-rank<r>-of-<world>.json`` (distinct names survive Ray's merge); a checkpoint
is trusted only when all ``world`` digest files are there and every file they list
matches (:func:`verify_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim.lr_scheduler import LRScheduler

from sane_ray import checksums, storage
from sane_ray.train.distributed import is_distributed, rank_and_world

_KEY = "train_state"
_RANK_DIGESTS = re.compile(r"checksums-rank(\d+)-of-(\d+)\.json")


class TrainState(Stateful):
    """Everything a resumed run needs: model, optimizer, scheduler, epochs done, metric history."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler,
        epoch: int = 0,
        history: list[dict[str, float]] | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.epoch = epoch
        self.history = history if history is not None else []

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optim": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            # JSON text: DCP flattens nested containers, so a list that is empty in the
            # loading template would not match the saved one.
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer,
            model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"],
        )
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.epoch = int(state_dict["epoch"])
        self.history = json.loads(state_dict["history"])


def save_train_state(state: TrainState, directory: str) -> None:
    """Collective when distributed: every rank calls it with its own local directory."""
    os.makedirs(directory, exist_ok=True)
    rank, world = rank_and_world()
    # One rank has nothing to coordinate. A coordinated save over gloo of FSDP2's optimizer
    # state also leaves later CPU steps ~20% slower in that process (OpenMP threads stop
    # spin-waiting; bench/README.md), which the uncoordinated save does not. Same files.
    with _single_process_quiet():
        dcp.save({_KEY: state}, checkpoint_id=directory, no_dist=world == 1)
    checksums.write_digests(directory, checksums.local_files(directory), digest_file=f"checksums-rank{rank}-of-{world}.json")


def verify_checkpoint(uri: str, s3: storage.S3Options | None = None) -> dict[str, bytes]:
    """Every file of the checkpoint at ``uri`` (local or S3), checked against all ranks' digests.

    Raises :class:`~sane_ray.checksums.IntegrityError` naming the bad file, or the
    missing digests of a checkpoint whose upload did not finish, and
    :class:`~sane_ray.storage.StorageError` when the storage could not be read (which
    proves nothing about the checkpoint).
    """
    try:
        names = storage.listdir(uri, s3)
    except storage.NotFoundError as e:
        raise checksums.IntegrityError(f"{uri}: checkpoint directory gone ({e})") from e
    ranks = {(int(m[1]), int(m[2])) for m in map(_RANK_DIGESTS.fullmatch, names) if m}
    worlds = {w for _, w in ranks}
    if len(worlds) != 1:
        what = "no checksums (incomplete upload?)" if not worlds else f"digests of different world sizes {sorted(worlds)}"
        raise checksums.IntegrityError(f"{uri}: {what}")
    (world,) = worlds
    missing = sorted(set(range(world)) - {r for r, _ in ranks})
    if missing:
        raise checksums.IntegrityError(f"{uri}: checksums of rank {missing[0]} of {world} missing (incomplete upload?)")
    contents: dict[str, bytes] = {}
    for rank in range(world):
        contents.update(checksums.verify_digests(uri, f"checksums-rank{rank}-of-{world}.json", s3))
    if ".metadata" not in contents:
        raise checksums.IntegrityError(f"{uri}: no DCP .metadata among the checksummed files")
    return contents


def load_train_state(state: TrainState, directory: str) -> None:
    """Restore ``state`` in place from a directory written by :func:`save_train_state`."""
    if not os.path.exists(os.path.join(directory, ".metadata")):
        raise FileNotFoundError(f"no DCP checkpoint (missing .metadata) in {directory}")
    with _single_process_quiet():
        dcp.load({_KEY: state}, checkpoint_id=directory, no_dist=not is_distributed())


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
