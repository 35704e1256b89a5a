"""Are sampled models new, and do they beat trivial generators? Kept models against the zoo and the prompts.

All distances are L2 in aligned weight space: every model goes through the run's
preprocessing (zoo models and prompts through :func:`~sane_ray.embed.preprocess.model_tokens`,
aligned to the run's reference, tokenized) and is compared on its raw (de-standardized)
real weights, so permuted copies of one network are at distance ~0.

Per kept model: the nearest checkpoint of the run's zoo (the epochs the run trained on,
models of the target's layout), the nearest checkpoint of a model the run *trained* on, the
highest IoU between its set of misclassified test samples and any zoo checkpoint's, and its
nearest prompt. Two memorization baselines (weight generators often lose to them: Zeng et
al., CVPR 2026) are built as many times as models are kept and BN-conditioned like the
candidates: "prompt + noise" (the kept model's nearest prompt plus an isotropic Gaussian
perturbation scaled to the same distance) and "prompt average" (the mean of two aligned
prompts drawn without replacement). Sampling that only copied its prompts would show
distance ~0 and IoU ~1; sampling that only perturbed or interpolated them would be matched
by a baseline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import ray
import torch

from sane_ray.embed.preprocess import model_tokens, preprocess
from sane_ray.sample.context import (
    NOISE,
    Context,
    cached_run,
    cached_task,
    condition,
    derive,
    load_candidate,
)
from sane_ray.sample.models import evaluate_split
from sane_ray.sample.prompts import PromptSet
from sane_ray.weights.tokenize import detokenize, layout_mask
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.reader import open_zoo

SOURCES = ("sampled", "prompt", "prompt + noise", "prompt average")  # rows of the memorization table


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool sets a (T,) against rows of b (M, T); two empty sets count as identical."""
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclasses.dataclass
class _Zoo:
    """The zoo checkpoints a kept model is compared with: aligned raw weights, misclassified sets."""

    vecs: torch.Tensor  # (M, real weights)
    wrong: torch.Tensor  # (M, test samples) bool
    names: list[str]
    trained: torch.Tensor  # (M,) bool: a checkpoint of a model the run trained on

    def nearest_train(self, vec: torch.Tensor) -> float:
        if not bool(self.trained.any()):
            return math.nan
        return float(torch.cdist(vec, self.vecs[self.trained]).min())


def _zoo_checkpoints(ctx: Context, run: Any, task: Any, zoo_uri: str, mask: torch.Tensor) -> _Zoo:
    lid = run.preprocessing.layout_id(ctx.architecture, ctx.arch_kwargs)
    trained_ids = {m for m, s in run.splits().items() if s == "train"}
    vecs, wrong, names, trained = [], [], [], []
    for model in open_zoo(zoo_uri).models if zoo_uri else []:
        if run.preprocessing.layout_id(model.architecture, model.arch_kwargs) != lid:
            continue
        mt = model_tokens(run, model, fallback_stats=ctx.stats)  # the epochs and weight limit the run used
        if mt.tokens is None:
            continue
        vecs.append(ctx.stats.invert_tokens(mt.tokens.tokens, ctx.layout)[:, mask])
        for ckpt, sd in mt.good:
            net = build_model(model.architecture, **model.arch_kwargs)
            net.load_state_dict(sd)
            wrong.append(evaluate_split(net, task.test)[2])
            names.append(f"{model.model_id}@{ckpt.epoch}")
            trained.append(model.model_id in trained_ids)
    return _Zoo(torch.cat(vecs) if vecs else torch.empty(0, int(mask.sum())),
                torch.stack(wrong) if wrong else torch.empty(0, len(task.test), dtype=torch.bool),
                names, torch.tensor(trained, dtype=torch.bool))


def _scored(ctx: Context, task: Any, raw: torch.Tensor, aside: dict[str, torch.Tensor], seed: int | None) -> dict[str, float]:
    """Validation and test accuracy of the network with raw tokens ``raw`` (N, d_t), BN-conditioned
    from ``seed`` like the candidates (None: as it is)."""
    net = build_model(ctx.architecture, **ctx.arch_kwargs)
    net.load_state_dict(detokenize(raw, ctx.layout, bn_state=aside))
    if seed is not None:
        condition(ctx, net, task, seed)
    return {"val_acc": evaluate_split(net, task.split("val"))[0], "test_acc": evaluate_split(net, task.test)[0]}


def novelty_task(ctx: Context, zoo_uri: str, prompt_names: list[str], prompt_raw: torch.Tensor,
                 prompt_aside: dict[str, torch.Tensor], kept: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"models": kept model id -> novelty columns, "memorization": one row per model of each source}``."""
    torch.set_num_threads(ctx.threads)
    run, task = cached_run(ctx.run_uri), cached_task(ctx.task_ref)
    mask = layout_mask(ctx.layout)
    zoo = _zoo_checkpoints(ctx, run, task, zoo_uri, mask)
    prompt_vecs = prompt_raw[:, mask]
    out, memo = {}, []

    def memo_row(source: str, name: str, vec: torch.Tensor, scores: dict[str, float]) -> None:
        memo.append({"source": source, "model": name, **scores, "nearest_train_l2": zoo.nearest_train(vec)})

    for j, name in enumerate(prompt_names):
        aside = {key: v[j] for key, v in prompt_aside.items()}
        memo_row("prompt", name, prompt_vecs[j : j + 1], _scored(ctx, task, prompt_raw[j], aside, None))
    for k, row in enumerate(kept):
        sd = load_candidate(row, ctx.candidates_uri)
        toks = preprocess(run, [sd], ctx.architecture, ctx.arch_kwargs, ctx.stats)  # its own model: its own anchor
        vec = ctx.stats.invert_tokens(toks.tokens, ctx.layout)[:, mask]
        net = build_model(ctx.architecture, **ctx.arch_kwargs)
        net.load_state_dict(sd)
        wrong = evaluate_split(net, task.test)[2]
        res: dict[str, Any] = {"weight_norm": float(vec.norm()), "nearest_train_l2": zoo.nearest_train(vec)}
        if zoo.names:
            dist = torch.cdist(vec, zoo.vecs)[0]
            iou = _iou(wrong, zoo.wrong)
            i, m = int(dist.argmin()), int(iou.argmax())
            res.update(nearest_zoo=zoo.names[i], nearest_zoo_l2=float(dist[i]), max_iou=float(iou[m]),
                       max_iou_zoo=zoo.names[m])
        memo_row("sampled", row["model_id"], vec, {"val_acc": row["val_acc"], "test_acc": row["test_acc"]})

        pd = torch.cdist(vec, prompt_vecs)[0]
        j = int(pd.argmin())
        d = float(pd[j])
        gen = torch.Generator().manual_seed(derive(ctx.seed, NOISE, k))
        noise = torch.randn(prompt_raw.shape[1:], generator=gen) * mask
        noisy = prompt_raw[j] + noise * (d / float(noise.norm()))
        aside = {key: v[j] for key, v in prompt_aside.items()}
        scores = _scored(ctx, task, noisy, aside, derive(ctx.seed, NOISE, k, 1))
        memo_row("prompt + noise", f"{prompt_names[j]}+noise-{k}", noisy[mask].unsqueeze(0), scores)
        res.update(nearest_prompt=prompt_names[j], nearest_prompt_l2=d, noise_baseline_test_acc=scores["test_acc"])

        if len(prompt_names) >= 2:
            a, b = np.random.default_rng(derive(ctx.seed, NOISE, k, 2)).choice(len(prompt_names), 2, replace=False)
            mean = (prompt_raw[a] + prompt_raw[b]) / 2
            aside = {key: (v[a] + v[b]) / 2 if v.is_floating_point() else v[a] for key, v in prompt_aside.items()}
            scores = _scored(ctx, task, mean, aside, derive(ctx.seed, NOISE, k, 3))
            memo_row("prompt average", f"avg({prompt_names[a]},{prompt_names[b]})", mean[mask].unsqueeze(0), scores)
        out[row["model_id"]] = res
    return {"models": out, "memorization": memo}


def novelty_rows(ctx: Context, run: Any, prompt_set: PromptSet, kept: list[dict[str, Any]],
                 opts: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`novelty_task` as one Ray task over the kept models (see its return value)."""
    zoo_uri = run.canonical.zoo_uri if run.canonical is not None else ""  # no zoo recorded: prompts only
    raw = prompt_set.stats.invert_tokens(prompt_set.tokens.tokens, prompt_set.layout)
    task = ray.remote(novelty_task).options(**opts)
    return ray.get(task.remote(ctx, zoo_uri, [p.name for p in prompt_set.prompts], raw,
                               prompt_set.tokens.bn_state, kept))
