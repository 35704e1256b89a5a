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
import logging
import math
import time
from collections.abc import Callable
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

log = logging.getLogger("sane_ray.sample")

SOURCES = ("sampled", "prompt", "prompt + noise", "prompt average")  # rows of the memorization table


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of bool sets a (T,) against rows of b (M, T); two empty sets count as identical."""
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


MAX_ZOO_TASKS = 256  # the zoo comparison's tasks: contiguous stretches of the zoo's models


@dataclasses.dataclass
class NearestZoo:
    """Running nearest zoo checkpoints of Q query models (the first K with misclassified sets).

    Fed one zoo model at a time, so memory stays flat in the zoo's size: only the queries and one
    zoo model's checkpoints are held (a ResNet-18 checkpoint's aligned weights are ~45 MB). Tasks
    each stream a stretch of the zoo; :meth:`merge` folds them in zoo order, and ties keep the
    earlier checkpoint, so the figures do not depend on how many tasks there were."""

    l2: torch.Tensor  # (Q,) nearest zoo checkpoint
    train_l2: torch.Tensor  # (Q,) nearest checkpoint of a model the run trained on
    iou: torch.Tensor  # (K,) highest IoU of misclassified sets
    l2_name: list[str]
    iou_name: list[str]
    seen: int = 0

    @classmethod
    def start(cls, queries: int, kept: int) -> NearestZoo:
        return cls(torch.full((queries,), math.inf), torch.full((queries,), math.inf), torch.full((kept,), -1.0),
                   [""] * queries, [""] * kept)

    def add(self, queries: torch.Tensor, wrong: list[torch.Tensor], vecs: torch.Tensor, zoo_wrong: torch.Tensor,
            names: list[str], trained: bool) -> None:
        """One zoo model's checkpoints, aligned raw weights (M, W) and misclassified sets (M, T), against
        the queries (Q, W) and the first K queries' misclassified sets."""
        self.merge(self._of_one(queries, wrong, vecs, zoo_wrong, names, trained))

    @classmethod
    def _of_one(cls, queries: torch.Tensor, wrong: list[torch.Tensor], vecs: torch.Tensor, zoo_wrong: torch.Tensor,
                names: list[str], trained: bool) -> NearestZoo:
        best, at = torch.cdist(queries, vecs).min(1)  # (Q,)
        ious = [_iou(mine, zoo_wrong) for mine in wrong]
        top = [int(i.argmax()) for i in ious]
        return cls(best, best if trained else torch.full_like(best, math.inf),
                   torch.tensor([float(i[m]) for i, m in zip(ious, top)]).reshape(len(wrong)),
                   [names[int(a)] for a in at], [names[m] for m in top], len(names))

    def merge(self, later: NearestZoo) -> None:
        """Fold in the figures of a later stretch of the zoo."""
        for q in torch.nonzero(later.l2 < self.l2).flatten().tolist():
            self.l2_name[q] = later.l2_name[q]
        for k in torch.nonzero(later.iou > self.iou).flatten().tolist():
            self.iou_name[k] = later.iou_name[k]
        self.l2, self.train_l2 = torch.minimum(self.l2, later.l2), torch.minimum(self.train_l2, later.train_l2)
        self.iou = torch.maximum(self.iou, later.iou)
        self.seen += later.seen

    def nearest_train(self, q: int) -> float:
        return float(self.train_l2[q]) if math.isfinite(float(self.train_l2[q])) else math.nan


def zoo_task(ctx: Context, models: list[Any], compared: tuple[torch.Tensor, list[torch.Tensor]]) -> NearestZoo:
    """The run's zoo checkpoints of the target's layout among ``models`` against the compared models
    (:func:`novelty_task`'s second result), one zoo model at a time."""
    torch.set_num_threads(ctx.threads)
    run, task = cached_run(ctx.run_uri), cached_task(ctx.task_ref)
    queries, wrong = compared
    mask = layout_mask(ctx.layout)
    lid = run.preprocessing.layout_id(ctx.architecture, ctx.arch_kwargs)
    trained_ids = {m for m, s in run.splits().items() if s == "train"}
    nearest = NearestZoo.start(len(queries), len(wrong))
    for model in models:
        if run.preprocessing.layout_id(model.architecture, model.arch_kwargs) != lid:
            continue
        mt = model_tokens(run, model, fallback_stats=ctx.stats)  # the epochs and weight limit the run used
        if mt.tokens is None:
            continue
        zoo_wrong, names = [], []
        for ckpt, sd in mt.good:
            net = build_model(model.architecture, **model.arch_kwargs)
            net.load_state_dict(sd)
            zoo_wrong.append(evaluate_split(net, task.test)[2])
            names.append(f"{model.model_id}@{ckpt.epoch}")
        nearest.add(queries, wrong, ctx.stats.invert_tokens(mt.tokens.tokens, ctx.layout)[:, mask],
                    torch.stack(zoo_wrong), names, model.model_id in trained_ids)
    return nearest


def _scored(ctx: Context, task: Any, raw: torch.Tensor, aside: dict[str, torch.Tensor], seed: int | None) -> dict[str, float]:
    """Validation and test accuracy of the network with raw tokens ``raw`` (N, d_t), BN-conditioned
    from ``seed`` like the candidates (None: as it is)."""
    net = build_model(ctx.architecture, **ctx.arch_kwargs)
    net.load_state_dict(detokenize(raw, ctx.layout, bn_state=aside))
    if seed is not None:
        condition(ctx, net, task, seed)
    return {"val_acc": evaluate_split(net, task.split("val"))[0], "test_acc": evaluate_split(net, task.test)[0]}


def novelty_task(ctx: Context, prompt_names: list[str], prompt_raw: torch.Tensor, prompt_aside: dict[str, torch.Tensor],
                 kept: list[dict[str, Any]]) -> tuple[dict[str, Any], tuple[torch.Tensor, list[torch.Tensor]]]:
    """``{"models": kept model id -> novelty columns, "memorization": one row per model of each source}``
    without the zoo figures, and the compared models for :func:`zoo_task`: their aligned raw weights
    (the kept models first, then each memorization row's ``query``) and the kept models' misclassified
    test samples."""
    torch.set_num_threads(ctx.threads)
    run, task = cached_run(ctx.run_uri), cached_task(ctx.task_ref)
    mask = layout_mask(ctx.layout)
    prompt_vecs = prompt_raw[:, mask]
    kept_vecs, kept_wrong, others = [], [], []  # queries: the kept models first, then the other memorization rows
    out, memo = {}, []

    def memo_row(source: str, name: str, vec: torch.Tensor | int, scores: dict[str, float]) -> None:
        if isinstance(vec, torch.Tensor):
            others.append(vec)
            vec = len(kept) + len(others) - 1
        memo.append({"source": source, "model": name, **scores, "query": vec})

    for j, name in enumerate(prompt_names):
        aside = {key: v[j] for key, v in prompt_aside.items()}
        memo_row("prompt", name, prompt_vecs[j : j + 1], _scored(ctx, task, prompt_raw[j], aside, None))
    for k, row in enumerate(kept):
        sd = load_candidate(row, ctx.candidates_uri)
        toks = preprocess(run, [sd], ctx.architecture, ctx.arch_kwargs, ctx.stats)  # its own model: its own anchor
        vec = ctx.stats.invert_tokens(toks.tokens, ctx.layout)[:, mask]
        net = build_model(ctx.architecture, **ctx.arch_kwargs)
        net.load_state_dict(sd)
        kept_vecs.append(vec)
        kept_wrong.append(evaluate_split(net, task.test)[2])
        res: dict[str, Any] = {"weight_norm": float(vec.norm())}
        memo_row("sampled", row["model_id"], k, {"val_acc": row["val_acc"], "test_acc": row["test_acc"]})

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

    return {"models": out, "memorization": memo}, (torch.cat(kept_vecs + others), kept_wrong)


def _zoo_columns(nearest: NearestZoo, models: dict[str, dict[str, Any]], memo: list[dict[str, Any]]) -> None:
    """Write the streamed zoo figures into the kept models' columns (query k: the k-th kept model) and
    the memorization rows (each names its query)."""
    for k, res in enumerate(models.values()):
        res["nearest_train_l2"] = nearest.nearest_train(k)
        if nearest.seen:
            res.update(nearest_zoo=nearest.l2_name[k], nearest_zoo_l2=float(nearest.l2[k]),
                       max_iou=float(nearest.iou[k]), max_iou_zoo=nearest.iou_name[k])
    for r in memo:
        r["nearest_train_l2"] = nearest.nearest_train(r.pop("query"))


def novelty_rows(ctx: Context, run: Any, prompt_set: PromptSet, kept: list[dict[str, Any]], opts: dict[str, Any],
                 collect: Callable[[list, str], list]) -> dict[str, Any]:
    """The novelty columns and memorization rows (:func:`novelty_task`): one task builds the compared
    models, then up to ``MAX_ZOO_TASKS`` tasks compare them with stretches of the zoo, in parallel;
    ``collect(refs, what)`` gathers those in order, logging progress."""
    zoo_uri = run.canonical.zoo_uri if run.canonical is not None else ""  # no zoo recorded: prompts only
    models = open_zoo(zoo_uri).models if zoo_uri else []
    raw = prompt_set.stats.invert_tokens(prompt_set.tokens.tokens, prompt_set.layout)
    log.info("novelty: comparing %d kept models, %d prompts and their baselines with %d zoo models of %s", len(kept),
             len(prompt_set.prompts), len(models), zoo_uri or "(no zoo recorded)")
    t0 = time.perf_counter()
    rows, compared = ray.remote(novelty_task).options(num_returns=2, **opts).remote(
        ctx, [p.name for p in prompt_set.prompts], raw, prompt_set.tokens.bn_state, kept)
    per = math.ceil(len(models) / MAX_ZOO_TASKS) or 1
    shard = ray.remote(zoo_task).options(**opts)
    parts = collect([shard.remote(ctx, models[i : i + per], compared) for i in range(0, len(models), per)], "novelty")
    res = ray.get(rows)
    queries = len(kept) + sum(r["source"] != "sampled" for r in res["memorization"])  # novelty_task's order
    nearest = NearestZoo.start(queries, len(kept))
    for part in parts:
        nearest.merge(part)
    _zoo_columns(nearest, res["models"], res["memorization"])
    log.info("novelty: %d zoo checkpoints compared in %.1fs", nearest.seen, time.perf_counter() - t0)
    return res
