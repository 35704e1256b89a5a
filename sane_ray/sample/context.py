"""What every task of a sampling job shares: its context, its seed streams, and per-process caches.

The driver fixes a :class:`Context` and ships it once through the object store; candidate,
fine-tuning and novelty tasks (:mod:`sane_ray.sample.job`, :mod:`sane_ray.sample.novelty`)
derive every random draw from ``Context.seed`` with :func:`derive` and one stream constant.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sane_ray import storage
from sane_ray.embed.run import Run, load_run
from sane_ray.sample.models import bn_condition, evaluate_split, fit_head, with_new_head
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import TokenLayout
from sane_ray.zoo.reader import load_checkpoint
from sane_ray.zoo.spec import CheckpointRecord, ModelRecord
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.tasks import TASK_SPLITS, Split, Task

# Streams of the seed: every random draw is derive(cfg.seed, STREAM, ...).
DRAW, INIT, BN, FINETUNE, SCRATCH, NOISE, HEAD = range(1, 8)
HEAD_FIT_SAMPLES = 2048  # training images a new head is fitted on before ranking


def derive(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and integer keys (independent streams per purpose and index)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Context:
    """What every task needs, fixed on the driver (shipped once through the object store)."""

    run_uri: str
    architecture: str
    arch_kwargs: dict[str, Any]  # the prompts': what the decoded tokens describe
    target_kwargs: dict[str, Any]  # the models the job builds: arch_kwargs with the task's class count
    new_head: bool  # the task has another class count: every model gets a new, seeded head
    layout_json: str
    stats_json: str
    task: str  # the task's source, for records and messages
    task_ref: Any  # the Task in the object store (sane_ray.sample.target)
    seed: int
    window_size: int
    halo: int | None
    max_abs: float  # the run's weight limit (run_max_abs): prompts reloaded for fine-tuning pass it as they did
    bn_condition: bool
    bn_batches: int
    bn_batch_size: int
    bn_momentum: float
    mode: str
    candidates_uri: str
    kept_uri: str
    finetune_epochs: int
    finetune_lr: float
    finetune_batch_size: int
    finetune_layers: str
    threads: int
    s3: storage.S3Options

    @functools.cached_property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_json(self.layout_json)

    @functools.cached_property
    def stats(self) -> StandardizationStats:
        return StandardizationStats.from_json(self.stats_json)


@functools.lru_cache(maxsize=2)
def cached_run(uri: str) -> Run:
    """The run, loaded once per worker process."""
    return load_run(uri)  # on the task's GPU when Ray gave it one


def share_task(task: Task) -> Any:
    """Put ``task`` in the object store as numpy arrays, which workers map without copying: one
    copy per node, however many worker processes score or fine-tune on it."""
    import ray

    # Arrays that own their memory: Ray serializes those out of band (a view of a torch tensor it pickles).
    arrays = {s: (task.split(s).x.numpy().copy(), task.split(s).y.numpy().copy()) for s in TASK_SPLITS}
    return ray.put((dataclasses.replace(task, train=None, val=None, test=None), arrays))


@functools.lru_cache(maxsize=2)
def cached_task(ref: Any) -> Task:
    """The job's task (:func:`share_task`), its tensors views of the node's object store."""
    import ray

    shell, arrays = ray.get(ref)
    with warnings.catch_warnings():  # read-only shared memory: the tensors are only ever read
        warnings.simplefilter("ignore", UserWarning)
        splits = {s: Split(torch.from_numpy(x), torch.from_numpy(y)) for s, (x, y) in arrays.items()}
    return dataclasses.replace(shell, **splits)


def metrics(net: torch.nn.Module, task: Task) -> dict[str, float]:
    """Accuracy and loss on every split of ``task``: a candidate's manifest metrics."""
    out = {}
    for split in TASK_SPLITS:
        out[f"{split}_acc"], out[f"{split}_loss"], _ = evaluate_split(net, task.split(split))
    return out


def condition(ctx: Context, net: torch.nn.Module, task: Task, seed: int) -> None:
    """BN-condition ``net`` as the run's settings say (nothing when BN-conditioning is off)."""
    if ctx.bn_condition:
        bn_condition(net, task.train, ctx.bn_batches, ctx.bn_batch_size, torch.Generator().manual_seed(seed),
                     ctx.bn_momentum)


def target_net(ctx: Context, sd: dict[str, torch.Tensor], head_seed: int) -> torch.nn.Module:
    """The job's network from weights of the prompts' architecture: as they are, or with a new head
    (seeded by ``head_seed``) when the task has another class count."""
    if ctx.new_head:
        return with_new_head(sd, ctx.architecture, ctx.target_kwargs, head_seed)
    net = build_model(ctx.architecture, **ctx.target_kwargs)
    net.load_state_dict(sd)
    return net


def fit_new_head(ctx: Context, net: torch.nn.Module, task: Task, seed: int) -> None:
    """With a new head, fit it in closed form on a seeded subset of the training split (else nothing)."""
    if ctx.new_head:
        n = min(HEAD_FIT_SAMPLES, len(task.train))
        idx = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed))[:n]
        fit_head(net, Split(task.train.x[idx], task.train.y[idx]), task.num_classes)


def load_candidate(row: dict[str, Any], root: str) -> dict[str, torch.Tensor]:
    """The weights of one candidate from its manifest row in the zoo at ``root`` (checksummed).

    No weight limit: the run's limit screens diverged zoo checkpoints, while a candidate is this
    job's own output, already scored and kept on its accuracy."""
    model = ModelRecord(row["model_id"], row["architecture"], json.loads(row["arch_kwargs"]))
    ckpt = CheckpointRecord(row["model_id"], row["epoch"], storage.join(root, row["path"]), sha256=row["sha256"])
    return load_checkpoint(model, ckpt, max_abs=math.inf)
