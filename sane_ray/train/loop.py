"""The per-worker training function run by ``ray.train.torch.TorchTrainer``.

Everything Ray-specific for a worker is here: dataset shards, ``ray.train.report``
(a barrier: every rank reports every epoch), checkpoints and resume. The model, loss,
FSDP, optimizer and checkpoint format come from their own modules.

``config`` (built by :func:`sane_ray.train.trainer.train_sane`):

- ``train``: a :class:`TrainConfig` as a dict
- ``steps_per_epoch``: optimizer steps per epoch and worker (sizes the OneCycle schedule)
- ``use_gpu``: bool
- ``datasets``: names of the fixed Ray Datasets given to Ray Train (read as they are every epoch)
- ``streams``: ``{name: stream}`` drawn per epoch by the workers (``stream.dataset(seed, epoch,
  rank, world)``, e.g. :class:`sane_ray.data.stream.WindowStream`): the reproducible path
- ``run_uri``: the run directory: checkpoints to resume from (:mod:`sane_ray.train.resume`),
  where rank 0 writes ``metrics.csv`` and ``summary.md`` after every epoch and exports the
  model and the loss curve at the end (None: nothing written, no resume)
- ``s3``: the :class:`~sane_ray.storage.S3Options` for ``run_uri`` (None: the AWS variables)
- ``export_files``: extra ``{name: bytes}`` written next to the exported model
- ``on_epoch_end``: optional ``callable(rank, epoch)`` run on every worker after each
  epoch's report (a hook for logging or fault injection)
- ``epoch_signal``: optional ``callable(model) -> {name: value}`` run on every worker every
  ``TrainConfig.probe_every`` epochs (and after the last), its values reported with the
  epoch's metrics; the pretraining job installs the probe signal
  (:func:`sane_ray.probe.signal.probe_signal`), so ``train/`` never imports the probe
- ``tracking``: optional experiment-tracking spec (:func:`sane_ray.train.tracking.open_tracker`):
  rank 0 logs the config once and every epoch's metrics
"""

from __future__ import annotations

import functools
import logging
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import ray.train
import ray.train.torch
import torch
from ray.data import Dataset, DataIterator
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sane_ray.config import from_dict
from sane_ray.model.export import export_model
from sane_ray.model.losses import GatherFn
from sane_ray.model.sane import SaneModel
from sane_ray.train.checkpoint import TrainState, save_train_state
from sane_ray.train.config import TrainConfig
from sane_ray.train.distributed import all_reduce_max, all_reduce_sum, gather_rows, is_distributed, rank_and_world
from sane_ray.train.fsdp import apply_fsdp, data_parallel_mesh
from sane_ray.train.optim import build_optimizer
from sane_ray.train.report import write_epoch_report
from sane_ray.train.resume import prune, restore
from sane_ray.train.runtime import Runtime, select_runtime
from sane_ray.train.step import compute_loss, optimizer_step, to_device, zero_prediction_loss
from sane_ray.train.tracking import Tracker, open_tracker

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> list[dict[str, float]]:
    """Train (or resume) the SANE model on this worker's shards; returns the metric history."""
    # The model's outputs come from Linear layers on 3-d inputs, i.e. views; FSDP2 warns
    # because an in-place op on them would lose its pre-backward hook. The step never
    # modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    cfg = from_dict(TrainConfig, config["train"])
    steps_per_epoch = int(config["steps_per_epoch"])
    runtime = select_runtime(bool(config["use_gpu"]), cfg.mixed_precision)
    device = ray.train.torch.get_device() if runtime.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the device mesh and NCCL use the current device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    rank, world = rank_and_world()
    _quiet_report_logs()

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank: FSDP keeps each rank's shard
    model = SaneModel(cfg.model).to(device)
    distributed = is_distributed()
    if distributed:
        apply_fsdp(model, data_parallel_mesh(runtime.device_type, world), runtime.param_dtype, runtime.reduce_dtype)
    optimizer, scheduler = build_optimizer(model, cfg.optim, cfg.epochs * steps_per_epoch)
    state = TrainState(model, optimizer, scheduler)
    restore(state, config.get("run_uri"), cfg.checkpoints_to_keep, config.get("s3"))

    tracker = open_tracker(config.get("tracking")) if rank == 0 else None
    try:
        _run_epochs(model, state, cfg, config, runtime, device, rank, world, distributed, tracker)
        _export(model, state, cfg, rank, distributed, config.get("run_uri"), config.get("export_files"))
    except BaseException:
        if tracker is not None:
            tracker.close(ok=False)
        raise
    if tracker is not None:
        tracker.close(ok=True)
    return state.history


def _run_epochs(
    model: SaneModel,
    state: TrainState,
    cfg: TrainConfig,
    config: dict[str, Any],
    runtime: Runtime,
    device: torch.device,
    rank: int,
    world: int,
    distributed: bool,
    tracker: Tracker | None,
) -> None:
    """Train from ``state.epoch`` to ``cfg.epochs``: report, checkpoint, write the epoch report, track."""
    steps_per_epoch = int(config["steps_per_epoch"])
    resumed_from = state.epoch
    scheduler = state.scheduler
    train_data = _epoch_data(config, "train", cfg.seed, rank, world)
    val_data = _epoch_data(config, "val", cfg.seed, rank, world)
    gather = gather_rows if distributed else None
    on_epoch_end: Callable[[int, int], None] | None = config.get("on_epoch_end")
    epoch_signal: Callable[[torch.nn.Module], dict[str, float]] | None = config.get("epoch_signal")

    epoch_ends = [time.perf_counter()]  # the loop's start, then the end of each epoch run here
    upcoming = _EpochBatches(train_data(state.epoch), cfg, device, state.epoch, rank) if state.epoch < cfg.epochs else None
    for epoch in range(state.epoch, cfg.epochs):
        # Noise and dropout are reseeded per epoch (and differ between ranks), so a resumed
        # run draws what an uninterrupted one would.
        noise = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch, rank))
        torch.manual_seed(epoch_seed(cfg.seed + 1, epoch, rank))
        metrics: dict[str, float] = {"epoch": float(epoch + 1)}
        metrics.update(_train_epoch(model, upcoming, state, cfg, runtime, device, gather, noise, distributed))
        # The next epoch's pipeline starts while this one evaluates and checkpoints.
        upcoming = _EpochBatches(train_data(epoch + 1), cfg, device, epoch + 1, rank) if epoch + 1 < cfg.epochs else None
        if val_data is not None:
            metrics.update(_evaluate(model, val_data(epoch), cfg, runtime, device, gather, distributed))
        if epoch_signal is not None and cfg.probe_every and ((epoch + 1) % cfg.probe_every == 0 or epoch + 1 == cfg.epochs):
            metrics.update(epoch_signal(model))
        metrics["lr"] = float(scheduler.get_last_lr()[0])
        metrics["peak_rss_mb"] = _peak_rss_mb(device)
        metrics["resumed_from_epoch"] = float(resumed_from)
        if rank == 0 and metrics["steps"] != steps_per_epoch:
            log.warning("epoch %d ran %d steps per worker, the schedule planned %d", epoch + 1, metrics["steps"], steps_per_epoch)
        state.epoch = epoch + 1
        state.history.append(metrics)
        due = state.epoch % cfg.checkpoint_every == 0 or state.epoch == cfg.epochs
        _report(state, metrics, with_checkpoint=due)
        if due and rank == 0 and config.get("run_uri"):
            prune(config["run_uri"], cfg.checkpoints_to_keep, config.get("s3"))
        epoch_ends.append(time.perf_counter())
        if rank == 0:
            # Ray Train's patched print() would log the line twice: write to the stream itself.
            sys.stdout.write(progress_line(metrics, cfg.epochs, _eta(epoch_ends, cfg.epochs - state.epoch)) + "\n")
            sys.stdout.flush()
            if config.get("run_uri"):
                write_epoch_report(state.history, config["run_uri"])
        if tracker is not None:
            tracker.log(metrics, step=state.epoch)
        if on_epoch_end is not None:
            on_epoch_end(rank, state.epoch)


def _epoch_data(
    config: dict[str, Any], name: str, seed: int, rank: int, world: int
) -> Callable[[int], Dataset | DataIterator] | None:
    """``epoch -> data`` of one split: a stream's dataset for (seed, epoch, rank), or this
    worker's Ray Train shard of a fixed dataset; None when the split was not given."""
    stream = config.get("streams", {}).get(name)
    if stream is not None:
        return functools.partial(stream.dataset, seed, rank=rank, world=world)
    if name in config.get("datasets", ()):
        shard = ray.train.get_dataset_shard(name)
        return lambda epoch: shard
    return None


def _quiet_report_logs() -> None:
    """Ray Train logs every report of every rank at INFO (metrics, checkpoint path) under a
    logger named by its source file, which RunConfig's log level does not reach."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its logs stay as they are
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a rank's draws in one epoch (noise, dropout, local shuffle buffer)."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % 2**32


class _EpochBatches:
    """One epoch's training batches whose first batch is fetched at once, on a daemon thread.

    Every epoch re-executes the Ray Data pipeline, and its first batch takes ~0.2 s of
    task start-up; for a small model that is over 10% of the epoch. Created when the
    previous epoch's training ends, the wait overlaps with its evaluation and checkpoint.
    The thread is a daemon so a failing run never waits for it.
    """

    def __init__(self, data: Dataset | DataIterator, cfg: TrainConfig, device: torch.device, epoch: int, rank: int):
        shuffle = cfg.local_shuffle_buffer_size > 0
        self._batches = iter(data.iter_torch_batches(
            batch_size=cfg.batch_size,
            local_shuffle_buffer_size=cfg.local_shuffle_buffer_size if shuffle else None,
            local_shuffle_seed=epoch_seed(cfg.seed, epoch, rank) if shuffle else None,
            drop_last=True,  # every rank must run the same number of equally sized steps
            device=device,
        ))
        self._first: dict[str, torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch_first, name="sane-next-epoch", daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._first = next(self._batches, None)
        except BaseException as e:  # re-raised in the training thread
            self._error = e

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not None:
            yield self._first
            yield from self._batches


def _train_epoch(
    model: SaneModel,
    epoch_batches: _EpochBatches,
    state: TrainState,
    cfg: TrainConfig,
    runtime: Runtime,
    device: torch.device,
    gather: GatherFn | None,
    noise: torch.Generator,
    distributed: bool,
) -> dict[str, float]:
    """One pass over the shard. Losses accumulate on the device: no host sync per step."""
    model.train()
    sums = torch.zeros(4, device=device)  # total, reconstruction, contrastive, grad norm
    steps = windows = tokens = 0
    wait = 0.0
    batches = iter(epoch_batches)
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        wait += time.perf_counter() - t0
        if batch is None:
            break
        batch = to_device(batch, device)
        parts = compute_loss(model, batch, cfg.model, runtime, gather, noise, autocast=not distributed)
        norm = optimizer_step(parts.total, model, state.optimizer, state.scheduler, cfg.optim.grad_clip)
        sums += torch.stack([parts.total.detach(), parts.reconstruction.detach(), parts.contrastive.detach(), norm])
        steps += 1
        windows += batch["x_i"].shape[0]
        tokens += 2 * batch["x_i"].shape[0] * batch["x_i"].shape[1]  # both views go through the model
    elapsed = time.perf_counter() - start
    counters = torch.tensor([steps, windows, tokens, wait, elapsed], dtype=torch.float64, device=device)
    totals = all_reduce_sum(torch.cat([sums.double(), counters]))
    loss, rec, con, norm, all_steps, all_windows, all_tokens, all_wait, all_elapsed = totals.tolist()
    _, world = rank_and_world()
    if all_steps == 0:
        raise RuntimeError(
            f"no training step in this epoch: each worker's shard holds fewer than batch_size={cfg.batch_size} windows"
        )
    mean_elapsed = all_elapsed / world
    return {
        "train_loss": loss / all_steps,
        "train_reconstruction": rec / all_steps,
        "train_contrastive": con / all_steps,
        "grad_norm": norm / all_steps,
        "steps": float(steps),
        "epoch_time_s": mean_elapsed,
        "tokens_per_s": all_tokens / mean_elapsed,
        "windows_per_s": all_windows / mean_elapsed,
        "data_wait_fraction": all_wait / all_elapsed,
    }


@torch.no_grad()
def _evaluate(
    model: SaneModel,
    data: Dataset | DataIterator,
    cfg: TrainConfig,
    runtime: Runtime,
    device: torch.device,
    gather: GatherFn | None,
    distributed: bool,
) -> dict[str, float]:
    """Validation loss on clean views (no noise), averaged over windows of all ranks.

    ``val_loss`` is the configured objective. The reconstruction is reported under both
    normalizations, whichever trains: ``val_reconstruction`` over the real entries,
    ``val_reconstruction_all`` over all entries (the reference's), so runs with either
    setting compare. ``val_zero_baseline`` is the (real-entry) reconstruction loss of
    predicting zeros on the same windows: the trivial baseline for ``val_reconstruction``.
    """
    model.eval()
    sums = torch.zeros(6, device=device)  # total, rec (real), rec (all), contrastive, zero baseline, windows
    for batch in data.iter_torch_batches(batch_size=cfg.batch_size, drop_last=False, device=device):
        batch = to_device(batch, device)
        parts = compute_loss(model, batch, cfg.model, runtime, gather, autocast=not distributed)
        rec = parts.by_norm
        per_batch = torch.stack([parts.total, rec["real"], rec["all"], parts.contrastive, zero_prediction_loss(batch)])
        b = batch["x_i"].shape[0]
        sums += torch.cat([per_batch * b, torch.tensor([float(b)], device=device)])
    *totals, windows = all_reduce_sum(sums).tolist()
    keys = ("val_loss", "val_reconstruction", "val_reconstruction_all", "val_contrastive", "val_zero_baseline")
    if windows == 0:
        return dict.fromkeys(keys, float("nan"))
    return {k: v / windows for k, v in zip(keys, totals)}


def progress_line(metrics: dict[str, float], epochs: int, eta_s: float) -> str:
    """One line per epoch for the console: losses, the validation baseline, throughput, ETA."""
    parts = [
        f"epoch {int(metrics['epoch'])}/{epochs}",
        f"train {metrics['train_loss']:.4f} (rec {metrics['train_reconstruction']:.4f})",
    ]
    if "val_loss" in metrics:
        parts.append(f"val {metrics['val_loss']:.4f} (rec {metrics['val_reconstruction']:.4f}, "
                     f"zeros {metrics['val_zero_baseline']:.4f})")
    parts += [
        f"{metrics['tokens_per_s']:,.0f} tokens/s",
        f"data wait {metrics['data_wait_fraction']:.0%}",
        f"ETA {_duration(eta_s)}",
    ]
    return " | ".join(parts)


def _eta(epoch_ends: list[float], remaining: int) -> float:
    """Seconds left at the mean epoch time, leaving out this run's first (warm-up) epoch once there are others."""
    times = [b - a for a, b in zip(epoch_ends, epoch_ends[1:])]
    return remaining * sum(times[1:] or times) / len(times[1:] or times)


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _peak_rss_mb(device: torch.device) -> float:
    """The largest peak resident set size of any worker process so far, in MiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return all_reduce_max(torch.tensor([rss_kib / 1024.0], dtype=torch.float64, device=device)).item()


def _report(state: TrainState, metrics: dict[str, float], with_checkpoint: bool) -> None:
    """``ray.train.report`` on every rank; with a checkpoint, every rank writes its DCP shards first."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    directory = tempfile.mkdtemp(prefix="sane-ckpt-")
    try:
        save_train_state(state, directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _export(
    model: SaneModel,
    state: TrainState,
    cfg: TrainConfig,
    rank: int,
    distributed: bool,
    run_uri: str | None,
    extra_files: dict[str, bytes] | None,
) -> None:
    """Gather the full weights (a collective) and let rank 0 write the model and the report."""
    if run_uri is None:
        return
    if distributed:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = model.state_dict()
    if rank == 0:
        from sane_ray.train.report import write_run_report  # matplotlib: only rank 0, only here

        export_model(full, cfg.model, run_uri, extra_files)
        write_run_report(state.history, run_uri)
