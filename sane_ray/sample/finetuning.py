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
    HEAD,
    SCRATCH,
    Context,
    cached_task,
    derive,
    fit_new_head,
    load_candidate,
    metrics,
    target_net,
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
    task = cached_task(ctx.task_ref)
    g = GROUPS.index(group)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(ctx.seed, FINETUNE, g, index))
        if group == "prompt":  # the prompts' architecture: a new head where the task needs one
            sd = load_checkpoint(ModelRecord(**source["model"]), CheckpointRecord(**source["checkpoint"]),
                                 max_abs=ctx.max_abs)
            net = target_net(ctx, sd, derive(ctx.seed, HEAD, g, index))
        else:  # the target already: a kept candidate, or the default initialization
            sd = (load_candidate(source, ctx.candidates_uri) if group == "sampled" else
                  default_state(ctx.architecture, ctx.target_kwargs, derive(ctx.seed, SCRATCH, index)))
            net = build_model(ctx.architecture, **ctx.target_kwargs)
            net.load_state_dict(sd)
        if group != "sampled":  # a kept candidate's head was fitted when it was scored
            fit_new_head(ctx, net, task, derive(ctx.seed, HEAD, g, index, 1))
        rows: list[dict[str, Any]] = []

        def save(epoch: int, model: torch.nn.Module) -> None:
            if group == "sampled":
                hp = {**json.loads(source["hparams"]), "finetune_lr": ctx.finetune_lr, "finetune_epochs": epoch}
                rows.append(write_checkpoint(ctx.kept_uri, name, epoch, model.state_dict(), metrics(model, task),
                                             ctx.architecture, ctx.target_kwargs, hp, ctx.s3))

        save(0, net)
        accs = finetune(net, task.train, task.test, ctx.finetune_epochs, ctx.finetune_lr, ctx.finetune_batch_size,
                        derive(ctx.seed, FINETUNE, g, index, 1), save, layers=ctx.finetune_layers)
    return {"group": group, "model_id": name, "test_acc": accs, "rows": rows}


def prompt_source(p: Any) -> dict[str, Any]:
    """What a fine-tuning task needs to load prompt ``p`` (plain data, so it travels to any worker)."""
    return {"model": {"model_id": p.model.model_id, "architecture": p.model.architecture,
                      "arch_kwargs": p.model.arch_kwargs, "hparams": p.model.hparams},
            "checkpoint": {"model_id": p.checkpoint.model_id, "epoch": p.checkpoint.epoch, "uri": p.checkpoint.uri,
                           "metrics": p.checkpoint.metrics, "sha256": p.checkpoint.sha256}}
