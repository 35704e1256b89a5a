"""Checkpoints with torch.distributed.checkpoint (DCP).

Every rank writes only its own shards into a directory (plus rank 0 the metadata);
Ray Train merges the ranks' directories into one checkpoint. Loading reshards, so a
checkpoint can be resumed with another number of workers. Without a process group
(a single process) the same calls write an unsharded checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim.lr_scheduler import LRScheduler

from sane_ray.train.distributed import is_distributed

_KEY = "train_state"


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


def save_checkpoint(state: TrainState, directory: str) -> None:
    """Collective when distributed: every rank calls it with its own local directory."""
    os.makedirs(directory, exist_ok=True)
    with _single_process_quiet():
        dcp.save({_KEY: state}, checkpoint_id=directory, no_dist=not is_distributed())


def load_checkpoint(state: TrainState, directory: str) -> None:
    """Restore ``state`` in place from a directory written by :func:`save_checkpoint`."""
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
