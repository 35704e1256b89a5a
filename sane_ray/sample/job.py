"""The sampling job (paper Algorithm 3) as a Ray batch job: prompts -> KDE -> candidates -> ranking.

The driver selects and embeds the prompts, fits the per-token distribution and hands it to
Ray tasks through the object store. Each task draws its candidates' latents (every
candidate from its own seed), decodes them with haloing, rebuilds the target's state
dicts, BN-conditions and scores them on the task's validation and test splits, and writes
each candidate as a checkpoint of the ``candidates`` zoo before returning its manifest row:
the driver holds metric rows, never the candidates' weights. After each round the best
``keep`` of all candidates so far are kept; a bootstrap round refits the KDE on the kept
candidates' latents (re-drawn from their seeds). Then one task per kept model, prompt and
model trained from scratch fine-tunes it for ``finetune_epochs`` (test accuracy per epoch;
the kept models' epochs go to the ``kept`` zoo), and a novelty task compares the kept
models with the run's zoo and the prompts (:mod:`sane_ray.sample.novelty`).

Output under ``out``: ``candidates/`` and ``kept/`` (native zoos, manifests published last),
``candidates.parquet`` / ``candidates.csv`` (every candidate, ranked), ``curves.csv`` (test
accuracy per fine-tuning epoch: sampled, prompts, scratch), ``finetune.png``,
``memorization.csv`` / ``.parquet`` and ``memorization.png`` (kept models against the
memorization baselines, :mod:`sane_ray.sample.novelty`),
``sample_config.yaml``, ``summary.json`` and ``summary.md`` (written last).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
import torch

from sane_ray import lease, storage
from sane_ray.cluster import ensure_ray, gpu_share, remote_args, task_plan
from sane_ray.config import dump_config
from sane_ray.embed.preprocess import run_max_abs
from sane_ray.embed.run import Run, load_run
from sane_ray.sample import report
from sane_ray.sample.candidates import SamplingFailedError, broken, make_candidates, rank
from sane_ray.sample.config import SampleConfig
from sane_ray.sample.context import Context, share_task
from sane_ray.sample.finetuning import finetune_one, prompt_source
from sane_ray.sample.kde import TokenKDE
from sane_ray.sample.models import check_positions
from sane_ray.sample.novelty import novelty_rows
from sane_ray.sample.prompts import PromptSet, load_prompts, prompt_latents, select_prompts
from sane_ray.sample.target import resolve_target
from sane_ray.zoo.native import publish_manifest
from sane_ray.zoo.reader import open_zoo

log = logging.getLogger("sane_ray.sample")

def _publish_candidates(job: _Job, rows: list[dict[str, Any]]) -> None:
    publish_manifest(job.ctx.candidates_uri,
                     [{k: v for k, v in r.items() if not k.startswith("hparams_")} for r in rows],
                     metadata={"sample": dataclasses.asdict(job.cfg)}, s3=job.s3)


def _gpus(cfg: SampleConfig) -> float:
    if cfg.gpus_per_task >= 0:
        return cfg.gpus_per_task
    return gpu_share(0.25)


def _collect(refs: list, what: str) -> list:
    """Results of ``refs`` in submission order (so sums over them do not depend on which task
    finished first), logging progress about every tenth as they finish."""
    pending, n, t0 = list(refs), len(refs), time.perf_counter()
    every = max(1, n // 10)
    while pending:
        _, pending = ray.wait(pending, num_returns=1)
        if (n - len(pending)) % every == 0 or not pending:
            log.info("%s: %d/%d tasks done in %.1fs", what, n - len(pending), n, time.perf_counter() - t0)
    return ray.get(refs)


def _write_table(out: str, name: str, table: pa.Table, s3: storage.S3Options) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(storage.join(out, f"{name}.parquet"), buf.getvalue(), s3)
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    storage.write_bytes_atomic(storage.join(out, f"{name}.csv"), buf.getvalue(), s3)


def _distribution(cfg: SampleConfig, run: Run, prompt_set: PromptSet, window: int) -> TokenKDE:
    if cfg.mode == "gauss":
        return TokenKDE.gaussian(prompt_set.layout.num_tokens, run.model.cfg.d_z, cfg.gauss_std)
    latents = prompt_latents(run, prompt_set, window, cfg.halo)
    return TokenKDE.fit(latents, cfg.bandwidth_rule, cfg.bandwidth, anchor=cfg.kde_anchor)


def run_sample(cfg: SampleConfig, s3: storage.S3Options | None = None) -> dict[str, Any]:
    """Run the job (see the module doc); returns the summary numbers (also in ``summary.md``)."""
    if not cfg.run:
        raise ValueError("SampleConfig.run is empty: give the exported pretraining run (--run URI)")
    s3 = (s3 or storage.S3Options()).resolved()
    out = storage.parse_uri(cfg.out or storage.join(cfg.run, "sample"), s3).uri
    with lease.acquire(out, "sample", s3):  # before Ray starts or a prompt is read
        job = _prepare(cfg, out, s3)
        kdes, rows, kept, sample_s = _sample_rounds(job)
        curves = _finetune_all(job, kept)
        return _report(job, kdes, rows, kept, curves, sample_s)


@dataclass
class _Job:
    """What every phase of one sampling job reads: its config, run, prompts and task context."""

    cfg: SampleConfig
    out: str
    s3: storage.S3Options
    run: Run
    prompts: list[Any]
    prompt_set: PromptSet
    task: dict[str, Any]  # what the job scores on (Target.describe); its data is in the object store only
    ctx: Context
    ctx_ref: ray.ObjectRef  # the context in the object store: one copy for every task
    opts: dict[str, Any]  # Ray options of its tasks


def _prepare(cfg: SampleConfig, out: str, s3: storage.S3Options) -> _Job:
    """Load the run, the prompts and the task, check they fit, start Ray and fix the tasks' context."""
    run = load_run(cfg.run, device="cpu")
    prompt_zoo_uri = cfg.prompts or (run.canonical.zoo_uri if run.canonical is not None else "")
    if not prompt_zoo_uri:
        raise ValueError(f"the run {cfg.run} records no zoo: give the prompt models (--prompts URI)")
    max_abs = run_max_abs(run)
    zoo = open_zoo(prompt_zoo_uri, s3=s3)
    prompts = select_prompts(zoo, cfg.prompt_models, cfg.prompt_epoch, cfg.prompt_best_k, cfg.prompt_architecture)
    prompt_set = load_prompts(run, prompts, max_abs, s3)
    arch, kwargs = prompt_set.architecture, prompt_set.arch_kwargs
    check_positions(run.model, prompt_set.layout, arch)
    target = resolve_target(cfg, zoo, arch, kwargs, s3)
    window = cfg.window_size or run.model.cfg.window_size
    log.info("sampling %s %s for task %s from %d prompts (%s) with %s", arch, kwargs, target.source, len(prompts),
             ", ".join(p.name for p in prompts), cfg.mode)

    ensure_ray(num_cpus=cfg.local_cpus or None)
    gpus = _gpus(cfg)
    opts = remote_args("gpu" if gpus else "cpu", cfg.cpus_per_task, gpus, node_types=cfg.node_types)
    log.info("%s", task_plan("sampling", math.ceil(cfg.candidates / cfg.candidates_per_task), cfg.cpus_per_task, gpus))
    ctx = Context(
        run_uri=run.uri, architecture=arch, arch_kwargs=kwargs, target_kwargs=target.target_kwargs,
        new_head=target.new_head, layout_json=prompt_set.layout.to_json(), stats_json=prompt_set.stats.to_json(),
        task=target.source, task_ref=share_task(target.task), seed=cfg.seed, window_size=window, halo=cfg.halo,
        max_abs=max_abs, bn_condition=cfg.bn_condition, bn_batches=cfg.bn_batches, bn_batch_size=cfg.bn_batch_size,
        bn_momentum=cfg.bn_momentum, mode=cfg.mode,
        candidates_uri=storage.join(out, "candidates"), kept_uri=storage.join(out, "kept"),
        finetune_epochs=cfg.finetune_epochs, finetune_lr=cfg.finetune_lr,
        finetune_batch_size=cfg.finetune_batch_size, finetune_layers=cfg.finetune_layers, threads=max(1, int(cfg.cpus_per_task)), s3=s3,
    )
    storage.makedirs(out, s3)
    return _Job(cfg, out, s3, run, prompts, prompt_set, target.describe(), ctx, ray.put(ctx), opts)


def _sample_rounds(job: _Job) -> tuple[list[TokenKDE], list[dict[str, Any]], list[dict[str, Any]], float]:
    """Every round's candidates (a bootstrap round refits the KDE on the kept ones); publishes the
    candidates zoo. Returns the KDE of each round, every candidate's row (ranked), the kept rows and
    the seconds spent."""
    cfg = job.cfg
    make = ray.remote(make_candidates).options(**job.opts)
    kdes, rows = [_distribution(cfg, job.run, job.prompt_set, job.ctx.window_size)], []
    t0 = time.perf_counter()
    for round_ in range(cfg.bootstrap + 1):
        kde_ref = ray.put(kdes[round_])
        chunks = [list(range(i, min(i + cfg.candidates_per_task, cfg.candidates)))
                  for i in range(0, cfg.candidates, cfg.candidates_per_task)]
        for part in _collect([make.remote(job.ctx_ref, kde_ref, round_, c) for c in chunks], f"round {round_}"):
            rows.extend({**r, **{f"hparams_{k}": v for k, v in json.loads(r["hparams"]).items()
                                 if k in ("round", "index")}} for r in part)
        kept = rank(rows, cfg.keep)
        if not kept:
            _publish_candidates(job, rows)
            raise SamplingFailedError(
                f"all {len(rows)} candidates are broken (non-finite loss or accuracy on {job.ctx.task}); "
                f"they are in the zoo {job.ctx.candidates_uri}")
        log.info("round %d: best val acc %.3f, kept mean val acc %.3f", round_, kept[0]["val_acc"],
                 float(np.mean([r["val_acc"] for r in kept])))
        if round_ < cfg.bootstrap:
            latents = torch.cat([kdes[r["hparams_round"]].sample([json.loads(r["hparams"])["draw_seed"]])
                                 for r in kept])
            kdes.append(TokenKDE.fit(latents, cfg.bandwidth_rule, cfg.bandwidth, anchor=cfg.kde_anchor))
    sample_s = time.perf_counter() - t0
    _publish_candidates(job, rows)
    return kdes, rows, kept, sample_s


def _finetune_all(job: _Job, kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fine-tune the kept candidates, the prompts and as many from-scratch models; publishes the kept zoo."""
    tune = ray.remote(finetune_one).options(**job.opts)
    models = [("sampled", r["model_id"], r, i) for i, r in enumerate(kept)]
    models += [("prompt", p.name, prompt_source(p), i) for i, p in enumerate(job.prompts)]
    models += [("scratch", f"scratch-{i:02d}", {}, i) for i in range(job.cfg.keep)]
    curves = _collect([tune.remote(job.ctx_ref, *m) for m in models], "fine-tuning")
    publish_manifest(job.ctx.kept_uri, [row for c in curves for row in c["rows"]],
                     metadata={"sample": dataclasses.asdict(job.cfg)}, s3=job.s3)
    return curves


def _report(job: _Job, kdes: list[TokenKDE], rows: list[dict[str, Any]], kept: list[dict[str, Any]],
            curves: list[dict[str, Any]], sample_s: float) -> dict[str, Any]:
    """Compare the kept models with the zoo and the prompts, then write the tables, plots and summary (last)."""
    cfg, out, s3, task = job.cfg, job.out, job.s3, job.ctx.task
    compare = cfg.novelty and not job.ctx.new_head  # zoo models' heads do not fit a task of other classes
    if cfg.novelty and not compare:
        log.info("novelty and memorization baselines skipped: they score zoo models, whose heads do not fit %s", task)
    compared = novelty_rows(job.ctx, job.run, job.prompt_set, kept, job.opts, _collect) if compare else {}
    novelty, memo = compared.get("models", {}), compared.get("memorization", [])
    table = report.candidate_table(rows, {r["model_id"] for r in kept}, curves, novelty, broken)
    _write_table(out, "candidates", table, s3)
    _write_table(out, "curves", report.curve_table(curves), s3)
    storage.write_bytes_atomic(storage.join(out, "finetune.png"), report.curves_png(curves, task), s3)
    if memo:
        _write_table(out, "memorization", pa.Table.from_pylist(memo), s3)
        storage.write_bytes_atomic(storage.join(out, "memorization.png"), report.memorization_png(memo, task), s3)
    storage.write_bytes_atomic(storage.join(out, "sample_config.yaml"), dump_config(cfg).encode(), s3)
    summary = report.summarize(cfg, job.prompts, kdes, rows, kept, curves, novelty, sample_s,
                               sum(map(broken, rows)), memo, job.task)
    storage.write_bytes_atomic(storage.join(out, "summary.json"), json.dumps(summary, indent=1).encode(), s3)
    storage.write_bytes_atomic(storage.join(out, "summary.md"), report.summary_markdown(summary).encode(), s3)
    log.info("sampled %d candidates in %.1fs (%.2f/s); results in %s", len(rows), sample_s, len(rows) / sample_s, out)
    print(f"sampling finished. Results: {out}/summary.md, {out}/candidates.csv, kept models: {out}/kept")
    return summary
