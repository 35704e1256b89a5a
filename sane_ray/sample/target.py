"""The sampling job's target task: named by the config or recorded by the prompt zoo, loaded once.

The driver loads the task (:func:`~sane_ray.zoo.task_sources.load_task`: a registered name,
an ``.npz``, an image folder, a Hugging Face or Parquet directory, an entry point), checks it
against the prompts' architecture before any sampling work (input shape; class count), and
puts it in the object store once: every task of the job reads it by reference
(:func:`sane_ray.sample.context.cached_task`), one copy per worker process.

A task with another class count than the architecture's head gets a *new head*: the target
keeps the architecture with the task's ``num_classes``; every sampled, prompt and
from-scratch model gets a seeded, re-initialized head (:func:`~sane_ray.sample.models.with_new_head`).
Candidates are then ranked after fitting the head in closed form
(:func:`~sane_ray.sample.models.fit_head`), and their accuracy before fine-tuning is reported
as "head fitted", not zero-shot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sane_ray import storage
from sane_ray.sample.config import SampleConfig
from sane_ray.sample.models import classifier
from sane_ray.zoo.architectures import build_model, input_shape
from sane_ray.zoo.spec import Zoo
from sane_ray.zoo.task_sources import check_task, load_task
from sane_ray.zoo.tasks import Task

log = logging.getLogger("sane_ray.sample")


@dataclass(frozen=True)
class Target:
    """The task a job samples for and the network it builds: ``target_kwargs`` are the prompts'
    architecture kwargs with the task's class count; ``new_head`` when that count differs."""

    task: Task
    source: str  # the task as given (or as the zoo recorded it)
    target_kwargs: dict[str, Any]
    new_head: bool

    def describe(self) -> dict[str, Any]:
        """What the results record about the task: source, shape, classes, normalization, head."""
        t = self.task
        return {"source": self.source, "input_shape": list(t.input_shape), "num_classes": t.num_classes,
                "sizes": {s: len(t.split(s)) for s in ("train", "val", "test")},
                "normalization": t.normalization.to_dict(), "new_head": self.new_head}


def task_source(cfg: SampleConfig, zoo: Zoo) -> str:
    """``cfg.task``, else the task the prompt zoo records; a zoo that records none needs ``--task``."""
    if cfg.task:
        return cfg.task
    if zoo.task:
        log.info("task: %s (recorded by the prompt zoo %s)", zoo.task, zoo.uri)
        return zoo.task
    raise ValueError(f"the prompt zoo {zoo.uri} records no task: give the data to score on (--task NAME, "
                     "FILE.npz, an image folder, a datasets/Parquet directory or module:function; docs/sampling.md)")


def resolve_target(cfg: SampleConfig, zoo: Zoo, architecture: str, arch_kwargs: dict[str, Any],
                   s3: storage.S3Options | None = None) -> Target:
    """Load the target task and check it fits ``architecture``: its input shape must match; another
    class count gives a new head (refused with ``cfg.new_head`` false)."""
    source = task_source(cfg, zoo)
    shape = tuple(input_shape(architecture, **arch_kwargs))
    classes = classifier(build_model(architecture, **arch_kwargs))[1].out_features
    options: dict[str, Any] = {}
    if cfg.task_normalize != "auto" or cfg.task_mean is not None or cfg.task_std is not None:
        options = {"normalize": cfg.task_normalize, "mean": cfg.task_mean, "std": cfg.task_std}
    task = load_task(source, s3=s3, image_column=cfg.task_image_column or None,
                     label_column=cfg.task_label_column or None, **options)
    mismatch = check_task(task, shape, classes, source, allow_new_classes=cfg.new_head)
    if mismatch is None:
        return Target(task, source, dict(arch_kwargs), False)
    log.info("task %s has %d classes, %s has %d outputs: a new, seeded head for every model (fine-tuning: %s)",
             source, mismatch.task_classes, architecture, mismatch.zoo_classes, cfg.finetune_layers)
    return Target(task, source, {**arch_kwargs, "num_classes": mismatch.task_classes}, True)
