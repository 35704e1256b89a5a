"""Are sampled models new? Each kept model against the run's zoo and the prompts.

All distances are L2 in aligned weight space: every model goes through the run's
preprocessing (aligned to the run's reference, tokenized) and is compared on its raw
(de-standardized) real weights, so permuted copies of one network are at distance ~0.

Per kept model: the nearest checkpoint of the run's zoo (the epochs the run trained on,
models of the target's layout), the highest IoU between its set of misclassified test
samples and any of those checkpoints', its nearest prompt, and the test accuracy of a
"prompt plus noise" baseline: that prompt plus an isotropic Gaussian perturbation scaled
to the same distance (BN-conditioned like the candidates). Sampling that only copied its
prompts would show distance ~0 and IoU ~1; sampling that only perturbed them would be
matched by the baseline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ray
import torch

from sane_ray.embed.preprocess import preprocess
from sane_ray.sample.job import (
    NOISE,
    Context,
    _cached_run,
    _cached_task,
    _condition,
    _load_row,
    derive,
)
from sane_ray.sample.models import evaluate_split
from sane_ray.sample.prompts import PromptSet
from sane_ray.weights.tokenize import detokenize, layout_mask
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.reader import load_model_checkpoints, open_zoo


def _raw(ctx: Context, run: Any, states: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
    """Aligned raw tokens (B, N, d_t) of checkpoints of one model, and their aside tensors."""
    toks = preprocess(run, states, ctx.architecture, ctx.arch_kwargs, ctx.stats)
    return ctx.stats.invert_tokens(toks.tokens, ctx.layout), toks.bn_state


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool sets a (T,) against rows of b (M, T); two empty sets count as identical."""
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def novelty_task(ctx: Context, zoo_uri: str, uses_epoch: tuple[list[int] | None, bool], max_abs: float,
                 prompt_names: list[str], prompt_states: list[dict[str, torch.Tensor]],
                 kept: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(ctx.threads)
    run, task = _cached_run(ctx.run_uri), _cached_task(ctx.task)
    mask = layout_mask(ctx.layout)
    lid = run.preprocessing.layout_id(ctx.architecture, ctx.arch_kwargs)
    epochs, skip_zero = uses_epoch

    zoo_vecs, zoo_wrong, zoo_names = [], [], []
    for model in open_zoo(zoo_uri).models if zoo_uri else []:
        if run.preprocessing.layout_id(model.architecture, model.arch_kwargs) != lid:
            continue
        model = dataclasses.replace(model, checkpoints=[
            c for c in model.checkpoints if not (skip_zero and c.epoch == 0) and (epochs is None or c.epoch in epochs)])
        good, _ = load_model_checkpoints(model, max_abs=max_abs)
        if not good:
            continue
        raw, _ = _raw(ctx, run, [sd for _, sd in good])
        zoo_vecs.append(raw[:, mask])
        for ckpt, sd in good:
            net = build_model(model.architecture, **model.arch_kwargs)
            net.load_state_dict(sd)
            zoo_wrong.append(evaluate_split(net, task.test)[2])
            zoo_names.append(f"{model.model_id}@{ckpt.epoch}")
    zoo_vecs_t = torch.cat(zoo_vecs) if zoo_vecs else torch.empty(0, int(mask.sum()))
    zoo_wrong_t = torch.stack(zoo_wrong) if zoo_wrong else torch.empty(0, len(task.test), dtype=torch.bool)

    prompt_raw, prompt_aside = zip(*(_raw(ctx, run, [sd]) for sd in prompt_states))
    prompt_vecs = torch.cat([r[:, mask] for r in prompt_raw])
    out = {}
    for k, row in enumerate(kept):
        sd = _load_row(row, ctx.candidates_uri)
        vec = _raw(ctx, run, [sd])[0][:, mask]
        net = build_model(ctx.architecture, **ctx.arch_kwargs)
        net.load_state_dict(sd)
        wrong = evaluate_split(net, task.test)[2]
        res: dict[str, Any] = {"weight_norm": float(vec.norm())}
        if len(zoo_names):
            dist = torch.cdist(vec, zoo_vecs_t)[0]
            iou = _iou(wrong, zoo_wrong_t)
            j, i = int(dist.argmin()), int(iou.argmax())
            res.update(nearest_zoo=zoo_names[j], nearest_zoo_l2=float(dist[j]), max_iou=float(iou[i]),
                       max_iou_zoo=zoo_names[i])
        pd = torch.cdist(vec, prompt_vecs)[0]
        j = int(pd.argmin())
        d = float(pd[j])
        gen = torch.Generator().manual_seed(derive(ctx.seed, NOISE, k))
        noise = torch.randn(prompt_raw[j].shape[1:], generator=gen) * mask
        noisy = prompt_raw[j][0] + noise * (d / float(noise.norm()))
        aside = {key: v[0] for key, v in prompt_aside[j].items()}
        base = build_model(ctx.architecture, **ctx.arch_kwargs)
        base.load_state_dict(detokenize(noisy, ctx.layout, bn_state=aside))
        _condition(ctx, base, task, derive(ctx.seed, NOISE, k, 1))
        res.update(nearest_prompt=prompt_names[j], nearest_prompt_l2=d,
                   noise_baseline_test_acc=evaluate_split(base, task.test)[0])
        out[row["model_id"]] = res
    return out


def novelty_rows(ctx: Context, run: Any, prompt_set: PromptSet, kept: list[dict[str, Any]],
                 opts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run :func:`novelty_task` as one Ray task over the kept models (model id -> novelty columns)."""
    settings = run.canonical.settings if run.canonical is not None else {}
    zoo_uri = run.canonical.zoo_uri if run.canonical is not None else ""  # no zoo recorded: prompts only
    max_abs = float(settings.get("max_abs_weight", math.inf))
    uses = (settings.get("epochs"), bool(settings.get("skip_epoch_zero")))
    task = ray.remote(novelty_task).options(**opts)
    return ray.get(task.remote(ctx, zoo_uri, uses, max_abs, [p.name for p in prompt_set.prompts],
                               prompt_set.states, kept))
