"""Generate model zoos on the digits tasks: one Ray task trains one model.

Like the public model zoos, models differ in seed, learning rate, weight decay,
activation, initialization and dropout; every choice is drawn from ``(cfg.seed, model
index)`` alone, and training is single-threaded with a seeded batch order, so a config
always yields bit-identical weights and metrics wherever the zoo is written (local disk
or S3). Local output on a multi-node cluster must be a shared filesystem; prefer S3.

Each task writes its own checkpoints (epoch 0 is the initialization) and returns its
manifest rows; the driver publishes the manifest only after every task succeeded, so a
failed run leaves no zoo. The generation config is stored in the manifest metadata:
:func:`ensure_zoo` reuses a published zoo with the same config instead of retraining.

While a zoo is written its root is leased (:mod:`sane_ray.lease`): a second writer is
refused. ``overwrite`` writes the new zoo beside the published one (under
``next/`` when the old one is in ``models/``, and back), and publishing its manifest is
the single step that replaces the old zoo; an interrupted overwrite leaves the old zoo
as it was. Only once a manifest is published does its writer remove every file under
the root that the manifest does not name: the old zoo's, and whatever interrupted
writers left, under either prefix.

``format: public`` writes the same models (same ids, weights and metrics) in the public
model-zoo layout (:mod:`sane_ray.zoo.public`), which has no manifest to publish last.
The whole zoo is written into a sibling directory ``.<name>.sane-ray-staging`` and
renamed into place once complete: the root holds the old zoo (or nothing) until then.
Replacing an old zoo takes two renames (old away, new in); in the microseconds between
them the root does not exist, and an interruption exactly there leaves both zoos beside
it, never a partial one at the root. Leftovers of a crashed writer are removed by the
next one. S3 has no rename, so ``format: public`` is refused there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

import numpy as np
import ray
import torch
from torch import nn
from tqdm.auto import tqdm

from sane_ray import lease, storage
from sane_ray.cluster import ensure_ray, remote_args, task_plan
from sane_ray.config import to_dict
from sane_ray.zoo import public
from sane_ray.zoo.architectures import ACTIVATIONS, build_model, get_architecture
from sane_ray.zoo.native import (
    MANIFEST,
    manifest_paths,
    publish_manifest,
    read_manifest,
    unlisted_files,
    write_checkpoint,
)
from sane_ray.zoo.spec import with_ggap
from sane_ray.zoo.tasks import DEFAULT_SPLIT_SEED, Task, evaluate, get_task

log = logging.getLogger(__name__)

# Bump when training changes in a way that changes checkpoints: cached zoos then regenerate.
GENERATOR_VERSION = 2
DIGITS_ARCHITECTURES = ("cnn_digits", "cnn_digits_bn", "cnn_digits_wide", "mlp_digits")
# Where a zoo's checkpoints live under its root: a fresh zoo in the first, an overwrite in the other one.
_PREFIXES = ("models", "next")
ZooFormat = Literal["native", "public"]


class ZooExistsError(FileExistsError):
    """A zoo is already published at the output URI and overwriting was not allowed."""


class ZooGenerationError(RuntimeError):
    """Training a model failed; no manifest was published."""


def _uniform_init(w: torch.Tensor) -> None:
    nn.init.uniform_(w, -0.3, 0.3)


def _normal_init(w: torch.Tensor) -> None:
    nn.init.normal_(w, 0.0, 0.2)


# Weight initializations (biases start at zero); "default" keeps PyTorch's layer init.
INITS: dict[str, Callable[[torch.Tensor], Any] | None] = {
    "default": None,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "uniform": _uniform_init,
    "normal": _normal_init,
}


@dataclass
class SearchSpace:
    """What varies per model: ``lr`` is a log-uniform range [low, high], the rest are choices."""

    lr: list[float] = field(default_factory=lambda: [5e-4, 1e-2])
    """Adam learning rate: [low, high], drawn log-uniformly per model."""
    weight_decay: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3])
    """Adam weight decay: one value picked per model."""
    activation: list[str] = field(default_factory=lambda: ["relu", "tanh", "gelu", "sigmoid", "silu", "leakyrelu"])
    """Hidden-layer activation: one picked per model."""
    init: list[str] = field(default_factory=lambda: list(INITS))
    """Weight initialization: one picked per model ("default" keeps PyTorch's layer init; the others zero biases)."""
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2])
    """Dropout rate: one picked per model."""


@dataclass
class ZooGenConfig:
    """How to generate one zoo. ``out`` defaults to a cache directory named after the config."""

    out: str | None = None
    """Where the zoo is written (path or s3://); null: <cache>/zoos/<task>-<arch>-<models>x<epochs>-s<seed>."""
    task: str = "digits"
    """The task every model trains on: digits, digits_transposed or digits_permuted (sane_ray.zoo.tasks)."""
    arch: str = "cnn_digits"
    """Architecture of every model: cnn_digits, cnn_digits_bn, cnn_digits_wide or mlp_digits."""
    models: int = 48
    """Models in the zoo, one Ray task each."""
    epochs: int = 10
    """Training epochs per model; a checkpoint is stored after each, plus epoch 0 (the initialization)."""
    seed: int = 0
    """Each model's seed and hyperparameters are drawn from (seed, model index): same seed, same zoo."""
    batch_size: int = 32
    """Training batch size of every model."""
    split_seed: int = DEFAULT_SPLIT_SEED
    """The task's stratified train/val/test split of the digits images (shared by all tasks)."""
    overwrite: bool = False
    """Replace a zoo already published at the zoo's location; false: refuse to."""
    format: ZooFormat = "native"
    """The layout written: native (safetensors + manifest) or public (modelzoos.cc)."""
    space: SearchSpace = field(default_factory=SearchSpace)
    node_types: bool = False
    """Train the models on nodes declaring sane_cpu_node (sane_ray.cluster, cluster/); false: anywhere."""

    def validate(self) -> None:
        """Fail on the driver, before any task starts, naming the bad setting."""
        if self.arch not in DIGITS_ARCHITECTURES:
            get_architecture(self.arch)  # unknown names get the registry's error
            raise ValueError(f"arch {self.arch!r} does not take 8x8 digits; use one of {', '.join(DIGITS_ARCHITECTURES)}")
        get_task(self.task, self.split_seed)
        if self.format not in get_args(ZooFormat):
            raise ValueError(f"format must be one of {', '.join(get_args(ZooFormat))}, got {self.format!r}")
        if self.format == "public" and self.out and storage.parse_uri(self.out).scheme == "s3":
            raise ValueError(
                "format public cannot be written to S3: the layout has no manifest to publish last and S3 "
                "has no rename, so an interrupted write would leave a partial zoo that readers trust; "
                "write it to a local or shared filesystem, or use format native on S3")
        for name in ("models", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        lo_hi = self.space.lr
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"space.lr must be [low, high] with 0 < low <= high, got {lo_hi}")
        for name in ("weight_decay", "activation", "init", "dropout"):
            if not getattr(self.space, name):
                raise ValueError(f"space.{name} must not be empty")
        unknown = sorted(set(self.space.init) - set(INITS))
        if unknown:
            raise ValueError(f"unknown init {unknown[0]!r} in space.init; known: {', '.join(INITS)}")
        unknown = sorted({a.lower() for a in self.space.activation} - set(ACTIVATIONS))
        if unknown:
            raise ValueError(f"unknown activation {unknown[0]!r} in space.activation; known: {', '.join(ACTIVATIONS)}")

    def identity(self) -> dict[str, Any]:
        """The settings that determine the zoo's contents (not its layout, where it goes or runs, or overwrite)."""
        d = to_dict(self)
        del d["out"], d["overwrite"], d["format"], d["node_types"]
        return {"generator_version": GENERATOR_VERSION, **d}


def zoo_uri(cfg: ZooGenConfig) -> str:
    """Where ``cfg``'s zoo goes: ``cfg.out``, else ``<cache>/zoos/<task>-<arch>-<models>x<epochs>-s<seed>``
    (with ``-public`` appended for the public layout)."""
    if cfg.out:
        return storage.parse_uri(cfg.out).uri
    name = f"{cfg.task}-{cfg.arch}-{cfg.models}x{cfg.epochs}-s{cfg.seed}" + ("-public" if cfg.format == "public" else "")
    return os.path.join(storage.cache_dir(), "zoos", name)


@dataclass(frozen=True)
class ModelPlan:
    """Everything one task needs to train one model, fixed on the driver."""

    model_id: str
    seed: int
    task: str
    split_seed: int
    arch: str
    arch_kwargs: dict[str, Any]
    hparams: dict[str, Any]
    epochs: int
    batch_size: int


def plan_models(cfg: ZooGenConfig) -> list[ModelPlan]:
    """Draw each model's seed and hyperparameters from ``(cfg.seed, index)`` alone."""
    plans = []
    sp = cfg.space
    for i in range(cfg.models):
        rng = np.random.default_rng([cfg.seed, i])
        seed = int(rng.integers(2**31 - 1))
        lr = float(f"{math.exp(rng.uniform(math.log(sp.lr[0]), math.log(sp.lr[1]))):.3g}")
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        wd, act, init, dropout = pick(sp.weight_decay), pick(sp.activation), pick(sp.init), pick(sp.dropout)
        plans.append(ModelPlan(
            model_id=f"model_{i:04d}",
            seed=seed,
            task=cfg.task,
            split_seed=cfg.split_seed,
            arch=cfg.arch,
            arch_kwargs={"activation": act, "dropout": float(dropout), "num_classes": 10},
            hparams={
                "index": i, "seed": seed, "lr": lr, "weight_decay": float(wd), "init": init,
                "optimizer": "adam", "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                "task": cfg.task, "split_seed": cfg.split_seed,
            },
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
        ))
    return plans


def initialize(model: nn.Module, scheme: str) -> None:
    """Re-initialize conv and linear weights with ``scheme`` and zero their biases."""
    fn = INITS[scheme]
    if fn is None:
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fn(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def train_model(
    plan: ModelPlan, task: Task, root: str, s3: storage.S3Options | None = None, zoo_format: ZooFormat = "native",
) -> list[dict[str, Any]]:
    """Train one model on ``task``, writing a checkpoint per epoch (0 = initialization); return its manifest rows.

    Runs single-threaded on a private RNG state (the caller's thread count and RNG are
    restored), so the result depends on the plan alone. In the public layout the rows
    are not published (no manifest); the model directory is whole once its ``params.json``,
    written last, exists.
    """
    if task.name != plan.task:
        raise ValueError(f"{plan.model_id} is planned for task {plan.task!r}, got task {task.name!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(plan.seed)
            return _train(plan, task, root, s3, zoo_format)
    finally:
        torch.set_num_threads(threads)


def _train(plan: ModelPlan, task: Task, root: str, s3: storage.S3Options | None,
           zoo_format: ZooFormat) -> list[dict[str, Any]]:
    model = build_model(plan.arch, **plan.arch_kwargs)
    initialize(model, plan.hparams["init"])
    # The fused kernel: one call per step instead of ~10 small ops per tensor (6x faster here).
    opt = torch.optim.Adam(
        model.parameters(), lr=plan.hparams["lr"], weight_decay=plan.hparams["weight_decay"], fused=True
    )
    order = torch.Generator().manual_seed(plan.seed + 1)
    x, y = task.train.x, task.train.y
    results: dict[int, dict[str, float]] = {}  # the public layout's result.json, by epoch

    def checkpoint(epoch: int) -> dict[str, Any]:
        metrics = {}
        for split in ("train", "val", "test"):
            metrics[f"{split}_acc"], metrics[f"{split}_loss"] = evaluate(model, task.split(split))
        if zoo_format == "public":
            public.write_checkpoint(root, plan.model_id, epoch, model.state_dict(), s3)
            results[epoch] = metrics
            return {"model_id": plan.model_id, "epoch": epoch, **with_ggap(metrics)}
        return write_checkpoint(
            root, plan.model_id, epoch, model.state_dict(), metrics,
            plan.arch, plan.arch_kwargs, plan.hparams, s3,
        )

    rows = [checkpoint(0)]
    model.train()
    for epoch in range(1, plan.epochs + 1):
        for idx in torch.randperm(len(y), generator=order).split(plan.batch_size):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rows.append(checkpoint(epoch))
    if zoo_format == "public":
        public.finish_model(root, plan.model_id, public.params_json(plan.arch, plan.arch_kwargs, plan.hparams),
                            results, s3)
    return rows


def _published(root: str, s3: storage.S3Options) -> tuple[str, dict[str, Any]] | None:
    """``(layout, metadata)`` of a zoo published at ``root``, else None."""
    if storage.exists(storage.join(root, MANIFEST), s3):
        return "native", read_manifest(root, s3).metadata
    if storage.exists(root, s3) and any(public.PARAMS in d.files for d in public.list_model_dirs(root, s3).values()):
        return "public", public.read_metadata(root, s3)
    return None


MODEL_TASK_CPUS = 1  # training is single-threaded (bit-identical weights wherever it runs)


def _collect(refs: dict, root: str, progress: bool, unpublished: str) -> list[dict[str, Any]]:
    """Wait for every task, showing progress; on the first failure cancel the rest, wait for them, and raise."""
    n = len(refs)
    bar = tqdm(total=n, unit="model", desc="zoo", disable=not (progress and sys.stderr.isatty()))
    log_every = max(1, n // 10)
    pending, rows, best, t0 = list(refs), [], -1.0, time.perf_counter()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    model_rows = ray.get(ref)
                except ray.exceptions.RayError as e:
                    for other in pending:
                        ray.cancel(other)
                    if pending:  # so that no task still writes once the caller cleans up
                        ray.wait(pending, num_returns=len(pending), timeout=60)
                    cause = getattr(e, "cause", None) or e
                    first = (str(cause).strip().splitlines() or [""])[0]
                    raise ZooGenerationError(
                        f"training {refs[ref].model_id} failed ({type(cause).__name__}: {first}); {unpublished}"
                    ) from e
                rows.extend(model_rows)
                best = max(best, model_rows[-1]["test_acc"])
                bar.update(1)
                bar.set_postfix(best_test_acc=f"{best:.3f}")
                finished = n - len(pending)
                if progress and bar.disable and (finished % log_every == 0 or finished == n):
                    log.info("zoo %s: %d/%d models trained in %.1fs, best test acc %.3f",
                             root, finished, n, time.perf_counter() - t0, best)
    finally:
        bar.close()
    return rows


def _train_all(cfg: ZooGenConfig, target: str, root: str, progress: bool, s3: storage.S3Options,
               unpublished: str) -> list[dict[str, Any]]:
    """Train every planned model as a Ray task writing under ``target``; their rows."""
    ensure_ray()
    if storage.parse_uri(root).scheme == "file" and len([n for n in ray.nodes() if n["Alive"]]) > 1:
        log.warning("writing zoo to local path %s from a multi-node cluster: it must be a shared filesystem", root)
    # The task's tensors are built once here and shared through the object store, so
    # workers need not import scikit-learn.
    task = ray.put(get_task(cfg.task, cfg.split_seed))
    plans = plan_models(cfg)
    log.info("%s", task_plan("model-training", len(plans), MODEL_TASK_CPUS))
    train = ray.remote(train_model).options(**remote_args("cpu", MODEL_TASK_CPUS, node_types=cfg.node_types))
    refs = {train.remote(p, task, target, s3, cfg.format): p for p in plans}
    return _collect(refs, root, progress, unpublished)


def generate_zoo(cfg: ZooGenConfig, progress: bool = True, s3: storage.S3Options | None = None) -> str:
    """Train ``cfg.models`` models as Ray tasks, publish the zoo, return its URI.

    Refuses (``ZooExistsError``) if a zoo of either layout is already published there,
    unless ``cfg.overwrite``, and (``LeaseHeldError``) while another writer holds it. S3 settings are resolved here (``s3`` or the AWS variables) and
    handed to the tasks, so they reach workers on any cluster.
    """
    cfg.validate()
    if cfg.format == "public":  # refuse here, before any task starts, what the layout cannot carry
        for p in plan_models(cfg):
            public.params_json(p.arch, p.arch_kwargs, p.hparams)
    s3 = (s3 or storage.S3Options()).resolved()
    root = zoo_uri(cfg)
    with lease.acquire(root, "make-zoo", s3) as held:
        published = _published(root, s3)
        if published is not None and not cfg.overwrite:
            raise ZooExistsError(
                f"a zoo is already published at {root} ({published[0]} layout); set overwrite=true to replace it")
        if cfg.format == "public":
            _generate_public(cfg, root, published is not None, held, progress, s3)
        else:
            _generate_native(cfg, root, published and published[0], progress, s3)
    return root


def _generate_native(cfg: ZooGenConfig, root: str, replaces: str | None, progress: bool,
                     s3: storage.S3Options) -> None:
    """Write beside the zoo being replaced (layout ``replaces``), publish the manifest, then remove every
    file it does not name (the old zoo's, and leftovers of interrupted writers under either prefix)."""
    in_use: set[str] = set()
    if replaces == "native":
        in_use = {p.split("/", 1)[0] for p in manifest_paths(root, s3)}
    elif replaces == "public":
        in_use = set(public.list_model_dirs(root, s3)) | {public.ZOO_MARKER}
    prefix = next(p for p in _PREFIXES if p not in in_use)
    # Checkpoints are written as root/models/... or root/next/models/...; a leftover of the
    # same name is replaced atomically, the others go with the sweep after publishing.
    target = root if prefix == "models" else storage.join(root, prefix)
    rows = _train_all(cfg, target, root, progress, s3, f"no manifest published at {root}")
    if target != root:
        rows = [{**r, "path": f"{prefix}/{r['path']}"} for r in rows]
    publish_manifest(root, rows, metadata={"generation": cfg.identity()}, s3=s3)
    storage.remove_files(root, unlisted_files(root, s3), s3)


def _beside(path: str, what: str) -> str:
    """A hidden sibling of the directory ``path`` (same filesystem, so a rename moves it)."""
    parent, name = os.path.split(path.rstrip(os.sep))
    return os.path.join(parent, f".{name}.sane-ray-{what}")


def _generate_public(cfg: ZooGenConfig, root: str, replaces: bool, held: lease.Lease, progress: bool,
                     s3: storage.S3Options) -> None:
    """Write the whole zoo into a staging sibling, then rename it into place."""
    path = storage.parse_uri(root).path
    staging, replaced = _beside(path, "staging"), _beside(path, "replaced")
    others = sorted(set(os.listdir(path)) - {lease.LEASE_FILE})
    if others and not replaces:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise FileExistsError(f"{root} holds files that are not a published zoo ({shown}); format public replaces "
                              "the whole directory, so give an empty or new one")
    for leftover in (staging, replaced):  # of a writer that crashed; we hold the lease, so they are no one's
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        _train_all(cfg, staging, root, progress, s3, f"nothing published at {root}")
        storage.write_bytes_atomic(os.path.join(staging, public.ZOO_MARKER),
                                   json.dumps({"generation": cfg.identity()}, sort_keys=True).encode())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    held.release()  # its file is in the root: it must neither go with the old zoo nor stay in the new one
    try:
        os.rename(path, replaced)
        try:
            os.rename(staging, path)
        except OSError:
            os.rename(replaced, path)
            raise
    except OSError as e:
        raise storage.StorageError(f"cannot publish the zoo at {root}: {e}; the complete zoo is in {staging}") from e
    shutil.rmtree(replaced)


def ensure_zoo(cfg: ZooGenConfig, progress: bool = True, s3: storage.S3Options | None = None) -> str:
    """The zoo for ``cfg``: reused if one with the same generation config is published, else generated.

    A published zoo with a *different* config or layout is replaced only with ``cfg.overwrite``.
    """
    cfg.validate()
    s3 = (s3 or storage.S3Options()).resolved()
    root = zoo_uri(cfg)
    published = _published(root, s3)
    if published is not None:
        layout, theirs = published[0], published[1].get("generation") or {}
        if layout == cfg.format and theirs == cfg.identity():
            return root
    if published is not None and not cfg.overwrite:
        diff = sorted(k for k in set(theirs) | set(cfg.identity()) if theirs.get(k) != cfg.identity().get(k))
        diff = (["format"] if layout != cfg.format else []) + diff
        raise ZooExistsError(
            f"a zoo with a different generation config is published at {root} (differs in: {', '.join(diff)}); "
            "set overwrite=true to replace it"
        )
    return generate_zoo(cfg, progress, s3)


def default_zoo_config() -> ZooGenConfig:
    """The built-in zoo the main job uses: 48 ``cnn_digits`` models x 10 epochs on ``digits``."""
    return ZooGenConfig()


def ensure_default_zoo(progress: bool = True, node_types: bool = False) -> str:
    """The built-in zoo's URI, generated on first use (its tasks placed by ``node_types``)."""
    return ensure_zoo(dataclasses.replace(default_zoo_config(), node_types=node_types), progress)


def zoo_or_default(zoo_uri: str, node_types: bool = False) -> str:
    """``zoo_uri``, or when it is empty the built-in digits zoo: what a run that names no zoo trains on."""
    if zoo_uri:
        return zoo_uri
    log.info("no zoo given: using the built-in digits zoo (generated on first use)")
    return ensure_default_zoo(progress=True, node_types=node_types)
