"""Wire the train loop into ``ray.train.torch.TorchTrainer``.

:func:`train_sane` is the entry point the jobs and the CLI call with Ray Datasets
in the batch format of docs/CONTRACTS.md. Re-running it with the same
``storage_path`` and ``name`` resumes from the newest checkpoint there that verifies
(:mod:`sane_ray.train.resume`); while it runs, the run directory is leased to it
(:mod:`sane_ray.lease`), so a second run into the same directory is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import ray.data
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, Result, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from sane_ray import lease, storage
from sane_ray.train import resume
from sane_ray.train.config import TrainConfig
from sane_ray.train.console import FaultReporter, RunConsole, describe_failure, root_failure
from sane_ray.train.loop import train_loop_per_worker
from sane_ray.train.runtime import select_runtime

DATASET_NAMES = ("train", "val")


class PretrainingFailedError(TrainingFailedError):
    """Training failed for good; the first line names the cause, the restarts spent and the run directory."""


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


def _rows_per_pass(train: Any, seed: int, num_workers: int) -> int:
    """Training rows all workers read per epoch (a stream cuts every worker to the same count)."""
    if isinstance(train, ray.data.Dataset):
        return train.count()
    return train.rows_per_rank(seed, num_workers) * num_workers


def train_sane(
    train_cfg: TrainConfig,
    datasets: Mapping[str, ray.data.Dataset | Any],
    storage_path: str,
    name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    export_files: Mapping[str, bytes] | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
    epoch_signal: Callable[[Any], dict[str, float]] | None = None,
    controller_failure_limit: int = -1,
    s3: storage.S3Options | None = None,
    tracking: Mapping[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    leased: bool = False,
) -> Result:
    """Pretrain SANE with ``num_workers`` FSDP2 workers; returns Ray's ``Result``.

    ``datasets`` holds ``"train"`` and optionally ``"val"``: Ray Datasets (split by Ray
    Train, read as they are every epoch) or streams that draw each epoch's dataset in the
    workers from the seed, epoch and rank (:class:`sane_ray.data.stream.WindowStream`,
    the reproducible way). Checkpoints and Ray's run
    state go to ``storage_path/name``; at the end rank 0 writes ``model.safetensors``,
    ``sane_config.json``, ``export_files``, ``loss_curve.png`` and ``summary.md`` there
    (load the model with :func:`sane_ray.model.export.load_sane`). ``result.return_value``
    is the per-epoch metric history. A run that exhausts its restarts raises ``PretrainingFailedError``.
    ``controller_failure_limit`` is Ray's (-1: retry scheduling forever; tests use 0).
    ``s3`` (default: the AWS variables) is resolved here and handed to the workers.
    ``tracking``: the experiment-tracking spec rank 0 logs to (:mod:`sane_ray.train.tracking`);
    ``callbacks``: Ray Train callbacks (a sweep's trial passes Tune's ``TuneReportCallback``).
    Raises :class:`~sane_ray.lease.LeaseHeldError` if another run writes the directory,
    :class:`~sane_ray.train.resume.ResumeError` if it holds checkpoints but none is usable.
    ``leased``: the caller holds the run directory's lease and ran the resume preflight
    under it (:func:`sane_ray.pretrain.run_pretrain` does both before it starts Ray).
    """
    unknown = sorted(set(datasets) - set(DATASET_NAMES))
    if "train" not in datasets or unknown:
        raise ValueError(f"datasets must hold 'train' and optionally 'val', got {sorted(datasets)}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    fixed = {k: v for k, v in datasets.items() if isinstance(v, ray.data.Dataset)}
    steps = train_cfg.steps_per_epoch or steps_per_epoch(
        _rows_per_pass(datasets["train"], train_cfg.seed, num_workers), num_workers, train_cfg.batch_size)
    s3 = (s3 or storage.S3Options()).resolved()
    run_uri = storage.join(storage.parse_uri(storage_path, s3).uri, name)
    loop_config = {
        "train": dataclasses.asdict(train_cfg),
        "steps_per_epoch": steps,
        "use_gpu": use_gpu,
        "datasets": sorted(fixed),
        "streams": {k: v for k, v in datasets.items() if k not in fixed},
        "run_uri": run_uri,
        "s3": s3,
        "export_files": dict(export_files or {}),
        "on_epoch_end": on_epoch_end,
        "epoch_signal": epoch_signal,
        "tracking": dict(tracking) if tracking else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=select_runtime(use_gpu, train_cfg.mixed_precision).backend),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=dict(resources_per_worker) if resources_per_worker else None,
        ),
        run_config=_run_config(train_cfg, storage_path, name, s3, controller_failure_limit, callbacks),
        datasets=fixed,
    )
    if leased:
        return _fit(trainer, run_uri, train_cfg.max_failures, s3)
    with lease.acquire(run_uri, "pretraining", s3):
        resume.preflight(run_uri, s3)
        return _fit(trainer, run_uri, train_cfg.max_failures, s3)


def _run_config(train_cfg: TrainConfig, storage_path: str, name: str, s3: storage.S3Options,
                controller_failure_limit: int, callbacks: Sequence[Any]) -> RunConfig:
    """Where Ray Train keeps the run, how often it restarts, and what it prints."""
    fs, path = storage.pyarrow_fs(storage_path, s3)
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(
            max_failures=train_cfg.max_failures, controller_failure_limit=controller_failure_limit
        ),
        # None: Ray deletes nothing; resume.prune keeps checkpoints_to_keep of all directories.
        checkpoint_config=CheckpointConfig(num_to_keep=None),
        logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's INFO goes to its log files only
        callbacks=[FaultReporter(train_cfg.max_failures), *callbacks],
    )


def _fit(trainer: TorchTrainer, run_uri: str, max_failures: int, s3: storage.S3Options) -> Result:
    """``trainer.fit()`` with Ray's output in the run's log file; a run that gives up raises one line."""
    console = RunConsole(run_uri, s3)
    try:
        with console:
            return trainer.fit()
    except TrainingFailedError as e:
        raise PretrainingFailedError(
            f"pretraining into {run_uri} failed after {max_failures} restart(s) "
            f"(train.max_failures): {failure_cause(e)}; its checkpoints are kept, rerun to resume "
            f"(Ray's tracebacks: {console.uri})"
        ) from e


def failure_cause(e: TrainingFailedError) -> str:
    """One line for what made Ray Train give up: the failing rank's error (a dead process first), or the controller's."""
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank = root_failure(failures)
        return describe_failure(rank, failures[rank])
    cause = getattr(e, "controller_failure", None) or e
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {text}"
