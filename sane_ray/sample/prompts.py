"""Prompt models: which checkpoints of a zoo seed the sampling distribution, and their token latents.

Selection (:func:`select_prompts`): the zoo's models (or the listed ids), each at its last
epoch or at ``epoch``, optionally only the best ``k`` by the zoo's validation accuracy.
Prompts must share one architecture (the target of sampling) and its arguments up to
``dropout`` (which does not change a network's function at inference); a best-k choice
takes the family of the best model. :func:`prompt_latents` preprocesses them as the run
would (aligned, tokenized, standardized; an architecture the run never saw with the
prompts' own statistics for layers the run lacks) and encodes them with haloing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from sane_ray.embed.encode import concat_tokens, encode_haloed, halo_plan
from sane_ray.embed.preprocess import (
    Preprocessing,
    own_stats,
    preprocess,
    stats_for_layout,
)
from sane_ray.embed.run import Run
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import TokenLayout, Tokens, layout_from_state_dict
from sane_ray.zoo.reader import load_checkpoint
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
                   best_k: int = 0) -> list[Prompt]:
    """The prompts of ``zoo`` (see the module doc), best first when ``best_k``, else in id order."""
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


def target_stats(prep: Preprocessing, architecture: str, arch_kwargs: dict[str, Any],
                 states: list[dict[str, torch.Tensor]], layout: TokenLayout) -> tuple[StandardizationStats, StandardizationStats | None]:
    """(statistics that standardize the target layout, the prompts' own statistics if they were needed):
    what :func:`~sane_ray.embed.preprocess.preprocess` uses for these prompts, so decoding inverts it."""
    lid = prep.layout_id(architecture, arch_kwargs)
    if lid in prep.layouts:
        return prep.layouts[lid].stats, None
    own = own_stats(prep, architecture, arch_kwargs, ([sd] for sd in states))
    return stats_for_layout(prep, layout, own, f"{architecture} {arch_kwargs}"), own


def load_prompts(run: Run, prompts: list[Prompt], max_abs: float) -> PromptSet:
    """Load and preprocess ``prompts`` as the run would (each aligned on its own)."""
    prep = run.preprocessing
    states = [load_checkpoint(p.model, p.checkpoint, max_abs=max_abs) for p in prompts]
    arch, kwargs = prompts[0].model.architecture, dict(prompts[0].model.arch_kwargs)
    layout = layout_from_state_dict(states[0], prep.token_size, prep.include_bn)
    stats, own = target_stats(prep, arch, kwargs, states, layout)
    tokens = concat_tokens([preprocess(run, [sd], arch, kwargs, own) for sd in states])
    return PromptSet(prompts, states, tokens, stats)


def prompt_latents(run: Run, prompt_set: PromptSet, window_size: int, halo: int | None) -> torch.Tensor:
    """Token latents (P, N, d_z) of the prompts, encoded with the same passes decoding uses."""
    toks = prompt_set.tokens
    plan = halo_plan(toks.tokens.shape[1], window_size, halo)
    return encode_haloed(run.model, toks.tokens, toks.pos, plan, run.preprocessing.pad_position).cpu()
