"""A pretraining whose rank 1 process is SIGKILLed once, after the checkpoint of epoch 1: ``python
tests/kill_worker_run.py ROOT``. Run as its own process (its own local Ray cluster, streaming
worker output to this driver as a user's run does) by ``tests/test_faults.py``."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

import ray
from ray.data import DataContext

from sane_ray.data.stream import quiet_data_context
from sane_ray.model import tiny
from sane_ray.train import TrainConfig, train_sane
from sane_ray.train.config import OptimConfig
from sane_ray.train.synthetic import synthetic_dataset

MODEL = dataclasses.replace(tiny(), window_size=8, d_model=32, d_z=8, projection_dim=8)


def main(root: str) -> None:
    marker = os.path.join(root, "killed")

    def kill_rank1_once(rank: int, epoch: int) -> None:
        if rank == 1 and epoch == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    ray.init(address="local", num_cpus=4, object_store_memory=200 * 1024**2, include_dashboard=False)
    quiet_data_context(DataContext.get_current())  # as the pretraining job does: no progress bars
    cfg = TrainConfig(model=MODEL, optim=OptimConfig(lr=1e-3), epochs=2, batch_size=8, num_threads=1,
                      checkpoints_to_keep=2, max_failures=1, steps_per_epoch=4)
    train_sane(cfg, {"train": synthetic_dataset(64, MODEL, seed=0)}, root, "run", num_workers=2,
                    resources_per_worker={"CPU": 1}, on_epoch_end=kill_rank1_once, controller_failure_limit=0)
    print("finished")


if __name__ == "__main__":
    main(sys.argv[1])
