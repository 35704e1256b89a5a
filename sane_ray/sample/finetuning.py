"""Fine-tuning with one budget: the kept candidates, the prompts and models trained from scratch.

One Ray task per model; each returns its test accuracy per epoch, and a kept candidate
also the manifest rows of its checkpoints in the ``kept`` zoo.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from sane_ray.sample.context import (
    FINETUNE,
    SCRATCH,
    Context,
    cached_task,
    derive,
    load_candidate,
    metrics,
)
from sane_ray.sample.models import default_state, finetune
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.native import write_checkpoint
from sane_ray.zoo.reader import load_checkpoint
from sane_ray.zoo.spec import CheckpointRecord, ModelRecord

GROUPS = ("sampled", "prompt", "scratch")  # fine-tuned: kept candidates, the prompts, models trained from scratch


def finetune_one(ctx: Context, group: str, name: str, source: dict[str, Any], index: int) -> dict[str, Any]:
    """Fine-tune one model (``group`` sampled / prompt / scratch) for ``ctx.finetune_epochs``; test
    accuracy per epoch, and for a sampled model the manifest rows of its checkpoints in the kept zoo."""
    torch.set_num_threads(ctx.threads)
    task = cached_task(ctx.task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(ctx.seed, FINETUNE, GROUPS.index(group), index))
        if group == "scratch":
            sd = default_state(ctx.architecture, ctx.arch_kwargs, derive(ctx.seed, SCRATCH, index))
        elif group == "sampled":
            sd = load_candidate(source, ctx.candidates_uri)
        else:
            sd = load_checkpoint(ModelRecord(**source["model"]), CheckpointRecord(**source["checkpoint"]),
                                 max_abs=ctx.max_abs)
        net = build_model(ctx.architecture, **ctx.arch_kwargs)
        net.load_state_dict(sd)
        rows: list[dict[str, Any]] = []

        def save(epoch: int, model: torch.nn.Module) -> None:
            if group == "sampled":
                hp = {**json.loads(source["hparams"]), "finetune_lr": ctx.finetune_lr, "finetune_epochs": epoch}
                rows.append(write_checkpoint(ctx.kept_uri, name, epoch, model.state_dict(), metrics(model, task),
                                             ctx.architecture, ctx.arch_kwargs, hp, ctx.s3))

        save(0, net)
        accs = finetune(net, task.train, task.test, ctx.finetune_epochs, ctx.finetune_lr, ctx.finetune_batch_size,
                        derive(ctx.seed, FINETUNE, GROUPS.index(group), index, 1), save)
    return {"group": group, "model_id": name, "test_acc": accs, "rows": rows}


def prompt_source(p: Any) -> dict[str, Any]:
    """What a fine-tuning task needs to load prompt ``p`` (plain data, so it travels to any worker)."""
    return {"model": {"model_id": p.model.model_id, "architecture": p.model.architecture,
                      "arch_kwargs": p.model.arch_kwargs, "hparams": p.model.hparams},
            "checkpoint": {"model_id": p.checkpoint.model_id, "epoch": p.checkpoint.epoch, "uri": p.checkpoint.uri,
                           "metrics": p.checkpoint.metrics, "sha256": p.checkpoint.sha256}}
