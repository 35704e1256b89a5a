"""Wire the train loop into ``ray.train.torch.TorchTrainer``.

:func:`run_pretraining` is the entry point the jobs and the CLI call with Ray Datasets
in the batch format of docs/CONTRACTS.md. Re-running it with the same
``storage_path`` and ``name`` resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import ray.data
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from sane_ray import storage
from sane_ray.train.config import TrainConfig
from sane_ray.train.loop import train_loop_per_worker
from sane_ray.train.runtime import select_runtime

DATASET_NAMES = ("train", "val")


def steps_per_epoch(num_rows: int, num_workers: int, batch_size: int) -> int:
    """Optimizer steps per epoch when ``num_rows`` are split equally over the workers.

    Ray's equal split gives each worker ``num_rows // num_workers`` rows; partial
    batches are dropped.
    """
    steps = (num_rows // num_workers) // batch_size
    if steps == 0:
        raise ValueError(
            f"the train dataset has {num_rows} windows: too few for {num_workers} workers "
            f"x batch_size={batch_size} (TrainConfig.batch_size is per worker)"
        )
    return steps


def run_pretraining(
    train_cfg: TrainConfig,
    datasets: Mapping[str, ray.data.Dataset],
    storage_path: str,
    name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    export_files: Mapping[str, bytes] | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
    controller_failure_limit: int = -1,
) -> Result:
    """Pretrain SANE with ``num_workers`` FSDP2 workers; returns Ray's ``Result``.

    ``datasets`` holds ``"train"`` and optionally ``"val"``. Checkpoints and Ray's run
    state go to ``storage_path/name``; at the end rank 0 writes ``model.safetensors``,
    ``sane_config.json``, ``export_files``, ``loss_curve.png`` and ``summary.md`` there
    (load the model with :func:`sane_ray.model.export.load_sane`). ``result.return_value``
    is the per-epoch metric history. A failed run raises ``ray.train.TrainingFailedError``.
    ``controller_failure_limit`` is Ray's (-1: retry scheduling forever; tests use 0).
    """
    unknown = sorted(set(datasets) - set(DATASET_NAMES))
    if "train" not in datasets or unknown:
        raise ValueError(f"datasets must hold 'train' and optionally 'val', got {sorted(datasets)}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    steps = train_cfg.steps_per_epoch or steps_per_epoch(datasets["train"].count(), num_workers, train_cfg.batch_size)
    runtime = select_runtime(use_gpu, train_cfg.mixed_precision)
    fs, path = storage.pyarrow_fs(storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": dataclasses.asdict(train_cfg),
            "steps_per_epoch": steps,
            "use_gpu": use_gpu,
            "has_val": "val" in datasets,
            "run_uri": storage.join(storage_path, name),
            "export_files": dict(export_files or {}),
            "on_epoch_end": on_epoch_end,
        },
        torch_config=TorchConfig(backend=runtime.backend),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=dict(resources_per_worker) if resources_per_worker else None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(
                max_failures=train_cfg.max_failures, controller_failure_limit=controller_failure_limit
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.checkpoints_to_keep),
        ),
        datasets=dict(datasets),
    )
    return trainer.fit()
