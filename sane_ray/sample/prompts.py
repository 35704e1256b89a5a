"""Prompt models: which checkpoints of a zoo seed the sampling distribution, and their token latents.

Selection (:func:`select_prompts`): the zoo's models (or the listed ids), each at its last
epoch or at ``epoch``, optionally only the best ``k`` by the zoo's validation accuracy.
Prompts must share one architecture (the target of sampling) and its arguments up to
``dropout`` (which does not change a network's function at inference); a best-k choice
takes the family of the best model. :func:`prompt_latents` preprocesses them as the run
would (aligned with their models' anchor checkpoints, tokenized, standardized; an architecture
the run never saw with the prompts' pooled statistics for layers the run lacks) and encodes
them with haloing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from sane_ray import storage
from sane_ray.embed.encode import concat_tokens, encode_haloed, halo_plan
from sane_ray.embed.preprocess import model_tokens, population_stats, stats_for_layout
from sane_ray.embed.run import Run
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import TokenLayout, Tokens
from sane_ray.zoo.spec import CheckpointRecord, ModelRecord, Zoo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    model: ModelRecord
    checkpoint: CheckpointRecord

    @property
    def name(self) -> str:
        return f"{self.model.model_id}@{self.checkpoint.epoch}"


def family(model: ModelRecord) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """Architecture and arguments that decide a network's function (dropout left out)."""
    return model.architecture, tuple(sorted((k, v) for k, v in model.arch_kwargs.items() if k != "dropout"))


def _at_epoch(model: ModelRecord, epoch: int | None) -> CheckpointRecord:
    if epoch is None:
        return model.last
    for c in model.checkpoints:
        if c.epoch == epoch:
            return c
    raise ValueError(f"prompt model {model.model_id} has no epoch {epoch} (it has {model.epochs}); "
                     "set prompt_epoch to one of them")


def _val_acc(p: Prompt) -> float:
    v = p.checkpoint.metrics.get("val_acc", math.nan)
    return -math.inf if v is None or math.isnan(v) else float(v)


def select_prompts(zoo: Zoo, model_ids: list[str] | None = None, epoch: int | None = None,
                   best_k: int = 0, architecture: str = "") -> list[Prompt]:
    """The prompts of ``zoo`` (see the module doc), best first when ``best_k``, else in id order;
    with ``architecture``, only models of that registry name (one architecture of a mixed zoo)."""
    if architecture:
        kept = [m for m in zoo.models if m.architecture == architecture]
        if not kept:
            have = ", ".join(sorted({m.architecture for m in zoo.models}))
            raise ValueError(f"prompt_architecture: zoo {zoo.uri} has no {architecture!r} model (it has {have})")
        zoo = dataclasses.replace(zoo, models=kept)
    if model_ids is not None:
        known = {m.model_id for m in zoo.models}
        missing = [i for i in model_ids if i not in known]
        if missing:
            raise ValueError(f"prompt_models: no model {missing[0]!r} in zoo {zoo.uri}")
        models = [zoo.model(i) for i in model_ids]
    else:
        models = list(zoo.models)
    if not models:
        raise ValueError(f"zoo {zoo.uri} has no models to prompt with")
    prompts = [Prompt(m, _at_epoch(m, epoch)) for m in models]
    if best_k:
        prompts.sort(key=lambda p: (-_val_acc(p), p.model.model_id))
        fam = family(prompts[0].model)
        same = [p for p in prompts if family(p.model) == fam]
        if len(same) < len(prompts):
            log.info("prompts: %d of %d models share the best model's architecture %s %s; choosing among them",
                     len(same), len(prompts), fam[0], dict(fam[1]))
        prompts = same[:best_k]
    families = {family(p.model) for p in prompts}
    if len(families) > 1:
        names = "; ".join(f"{a} {dict(kw)}" for a, kw in sorted(families))
        raise ValueError(f"prompts differ in architecture or its arguments ({names}): sampling needs one target; "
                         "select them with prompt_models or prompt_best_k")
    return prompts


@dataclass
class PromptSet:
    """Loaded prompts: raw state dicts, preprocessed tokens and how the target layout is standardized."""

    prompts: list[Prompt]
    states: list[dict[str, torch.Tensor]]
    tokens: Tokens  # (P, N, d_t) standardized
    stats: StandardizationStats  # of the target layout (the run's, or its layers' + the prompts')

    @property
    def layout(self) -> TokenLayout:
        return self.tokens.layout

    @property
    def architecture(self) -> str:
        return self.prompts[0].model.architecture

    @property
    def arch_kwargs(self) -> dict[str, Any]:
        return dict(self.prompts[0].model.arch_kwargs)


def load_prompts(run: Run, prompts: list[Prompt], max_abs: float, s3: storage.S3Options | None = None) -> PromptSet:
    """Load and preprocess ``prompts`` as the run would, through the one path for zoo models
    (:func:`~sane_ray.embed.preprocess.model_tokens`: each aligned with the permutation of its
    model's anchor checkpoint). For an architecture the run never saw, layers its statistics do
    not cover are standardized with statistics pooled over the prompts, which decoding inverts."""
    prep = run.preprocessing
    arch, kwargs = prompts[0].model.architecture, dict(prompts[0].model.arch_kwargs)
    lid = prep.layout_id(arch, kwargs)
    own = population_stats(run, [dataclasses.replace(p.model, checkpoints=[p.checkpoint]) for p in prompts],
                           s3, max_abs).get(lid)
    parts = []
    for p in prompts:
        mt = model_tokens(run, p.model, [p.checkpoint.epoch], s3=s3, max_abs=max_abs, fallback_stats=own)
        if mt.tokens is None:
            bad = mt.skipped[0] if mt.skipped else None
            raise ValueError(f"prompt {p.name}: {bad.path if bad else p.checkpoint.uri}: unusable checkpoint "
                             f"({bad.reason if bad else 'not found'})")
        parts.append(mt)
    tokens = concat_tokens([mt.tokens for mt in parts])
    stats = prep.layouts[lid].stats if lid in prep.layouts else stats_for_layout(prep, tokens.layout, own, f"{arch} {kwargs}")
    return PromptSet(prompts, [mt.good[0][1] for mt in parts], tokens, stats)


def prompt_latents(run: Run, prompt_set: PromptSet, window_size: int, halo: int | None) -> torch.Tensor:
    """Token latents (P, N, d_z) of the prompts, encoded with the same passes decoding uses."""
    toks = prompt_set.tokens
    plan = halo_plan(toks.tokens.shape[1], window_size, halo)
    return encode_haloed(run.model, toks.tokens, toks.pos, plan, run.preprocessing.pad_position).cpu()
