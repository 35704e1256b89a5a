"""Folders of models in the Hugging Face layout (``save_pretrained``, HF Trainer output dirs), read in place.

One directory per model (its name is the model id)::

    <model>/config.json                            architecture and hyperparameters
    <model>/model.safetensors | pytorch_model.bin  the final weights (safetensors preferred)
    <model>/metrics.json | all_results.json | trainer_state.json          optional metrics
    <model>/checkpoint-<step>/model.safetensors | pytorch_model.bin      intermediate checkpoints
    <model>/checkpoint-<step>/metrics.json                                optional metrics

**Epochs are training steps**: ``checkpoint-<step>`` is epoch ``step`` (``checkpoint-0``, if
written, is the initialization). The top-level weights are the final checkpoint, at the
``global_step`` of ``<model>/trainer_state.json``, else one step past the last checkpoint
(1 without checkpoints: never 0, which marks an initialization); a checkpoint directory at
that same step holds the same training state and is skipped. A model may also have no
top-level weights (a Trainer output dir mid-run): its checkpoints are the model.

**Architecture** (:func:`architecture_from_config`): ``sane_ray_architecture`` (a registry
name) if present, else the first of HF's ``architectures`` class names, then ``model_type``,
that names a registry architecture ignoring case, ``_`` and ``-`` (``CnnDigits`` ->
``cnn_digits``). Keyword arguments are ``sane_ray_arch_kwargs`` if present, else the
config's top-level keys that the architecture takes as arguments. Every other key is a
hyperparameter (``ModelRecord.hparams``).

**Metrics**, per weights file, later sources overriding earlier ones: the ``log_history``
entries of ``trainer_state.json`` (the model's, else its last checkpoint's: HF writes the
whole history so far into each) logged at that step; for the final weights also
``all_results.json``; then the ``metrics.json`` beside the weights. HF's names map to
:data:`~sane_ray.zoo.spec.METRICS` (``eval_accuracy`` -> ``val_acc``, ``loss`` ->
``train_loss``, see :data:`METRIC_NAMES`); what no source has is NaN.

Reading needs one recursive listing and the small JSON files (fetched concurrently on
S3); weights are only opened when loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sane_ray import storage
from sane_ray.zoo.architectures import ARCHITECTURES, UnknownArchitectureError, arguments
from sane_ray.zoo.checks import as_float, reference_layout, skip
from sane_ray.zoo.public import read_metadata
from sane_ray.zoo.spec import CheckpointRecord, ModelRecord, Skipped, Zoo, with_ggap

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in order of preference
METRICS_FILE, ALL_RESULTS, TRAINER_STATE = "metrics.json", "all_results.json", "trainer_state.json"
ARCH_KEY, ARCH_KWARGS_KEY = "sane_ray_architecture", "sane_ray_arch_kwargs"
_HF_ARCH_KEYS = ("architectures", "model_type")
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
_MODEL_FILES = {CONFIG, *WEIGHTS, METRICS_FILE, ALL_RESULTS, TRAINER_STATE}
_CHECKPOINT_FILES = {*WEIGHTS, METRICS_FILE, TRAINER_STATE}
# Each METRICS name and the names HF Trainer logs it under (the first one present wins).
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "train_acc": ("train_acc", "train_accuracy"),
    "val_acc": ("val_acc", "eval_accuracy", "eval_acc", "val_accuracy"),
    "test_acc": ("test_acc", "test_accuracy"),
    "train_loss": ("train_loss", "loss"),
    "val_loss": ("val_loss", "eval_loss"),
    "test_loss": ("test_loss",),
    "ggap": ("ggap",),
}


def _squash(name: str) -> str:
    return re.sub(r"[_\-]", "", name).lower()


_BY_SQUASHED = {_squash(name): name for name in ARCHITECTURES}


def architecture_from_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Registry name, keyword arguments and hyperparameters of a model's ``config.json`` (rule: module docstring).

    Raises ``UnknownArchitectureError`` naming what the config says and the registered names,
    ``ValueError`` for a ``sane_ray_arch_kwargs`` that is not an object.
    """
    if ARCH_KEY in config:
        said = f"{ARCH_KEY}={config[ARCH_KEY]!r}"
        arch = config[ARCH_KEY] if config[ARCH_KEY] in ARCHITECTURES else None
    else:
        named = config.get("architectures") or []
        candidates = [*([named] if isinstance(named, str) else named), config.get("model_type")]
        said = ", ".join(f"{k}={config[k]!r}" for k in _HF_ARCH_KEYS if k in config) or f"no {ARCH_KEY}"
        arch = next((_BY_SQUASHED[_squash(c)] for c in candidates if isinstance(c, str) and _squash(c) in _BY_SQUASHED),
                    None)
    if arch is None:
        raise UnknownArchitectureError(
            f"no registered architecture in it ({said}); registered: {', '.join(sorted(ARCHITECTURES))}")
    if ARCH_KWARGS_KEY in config:
        kwargs = config[ARCH_KWARGS_KEY]
        if not isinstance(kwargs, dict):
            raise ValueError(f"{ARCH_KWARGS_KEY} must be a JSON object, got {kwargs!r}")
        taken = {ARCH_KEY, ARCH_KWARGS_KEY, *_HF_ARCH_KEYS}
    else:
        kwargs = {k: config[k] for k in sorted(arguments(arch)) if k in config}
        taken = {ARCH_KEY, *_HF_ARCH_KEYS, *kwargs}
    return arch, dict(kwargs), {k: v for k, v in config.items() if k not in taken}


def hub_metrics(source: Mapping[str, Any] | None) -> dict[str, float]:
    """The :data:`METRICS` a metrics object holds, under their own or HF's names (absent ones left out)."""
    out: dict[str, float] = {}
    for metric, names in METRIC_NAMES.items():
        name = next((n for n in names if n in (source or {})), None)
        if name is not None:
            out[metric] = as_float(source[name])
    return out


@dataclass
class HubModelDir:
    """What a listing shows of one model directory (nothing opened yet)."""

    name: str
    files: set[str] = field(default_factory=set)
    checkpoints: dict[str, int] = field(default_factory=dict)  # checkpoint directory -> step
    checkpoint_files: dict[str, set[str]] = field(default_factory=dict)

    def has_weights(self) -> bool:
        return bool(self.files & set(WEIGHTS)) or any(f & set(WEIGHTS) for f in self.checkpoint_files.values())


def list_model_dirs(listing: Iterable[str]) -> dict[str, HubModelDir]:
    """Model directories in a root's recursive listing (relative paths, directories included).

    Only the files this layout reads count; the rest of an HF output dir (tokenizer files,
    ``optimizer.pt``, ``training_args.bin``, ``runs/``) is ignored.
    """
    dirs: dict[str, HubModelDir] = {}
    for rel in listing:
        parts = rel.split("/")
        if len(parts) not in (2, 3):
            continue
        model, name = parts[0], parts[1]
        m = _CHECKPOINT_DIR.fullmatch(name)
        if len(parts) == 2 and name in _MODEL_FILES:
            dirs.setdefault(model, HubModelDir(model)).files.add(name)
        elif m:
            d = dirs.setdefault(model, HubModelDir(model))
            d.checkpoints[name] = int(m.group(1))
            files = d.checkpoint_files.setdefault(name, set())
            if len(parts) == 3 and parts[2] in _CHECKPOINT_FILES:
                files.add(parts[2])
    return dirs


def is_hub(dirs: Mapping[str, HubModelDir]) -> bool:
    """Whether listed directories show this layout: some model directory with ``config.json`` and weights."""
    return any(CONFIG in d.files and d.has_weights() for d in dirs.values())


def read_hub(root: str, dirs: Mapping[str, HubModelDir], s3: storage.S3Options | None = None) -> Zoo:
    """The zoo in the listed model directories; unusable models and checkpoints go to ``skipped``."""
    wanted = [rel for d in dirs.values() for rel in _small_files(d)]
    fs, base = storage.open_uri(root, s3)
    base = base.rstrip("/")
    fetched = fs.cat([f"{base}/{rel}" for rel in wanted], on_error="return") if wanted else {}
    raw = {rel: fetched.get(f"{base}/{rel}") for rel in wanted}
    models: list[ModelRecord] = []
    skipped: list[Skipped] = []
    for name in sorted(dirs):
        rec = _read_model(root, dirs[name], raw, skipped)
        if rec is not None:
            models.append(rec)
    return Zoo(uri=root, format="hf", models=models, skipped=skipped, metadata=read_metadata(root, s3))


def _small_files(d: HubModelDir) -> list[str]:
    """The JSON files of a model to fetch (relative to the root): one trainer state at most."""
    out = [f"{d.name}/{f}" for f in (CONFIG, METRICS_FILE, ALL_RESULTS, TRAINER_STATE) if f in d.files]
    out += [f"{d.name}/{c}/{METRICS_FILE}" for c, files in d.checkpoint_files.items() if METRICS_FILE in files]
    if TRAINER_STATE not in d.files:
        last = max((c for c, files in d.checkpoint_files.items() if TRAINER_STATE in files),
                   key=lambda c: d.checkpoints[c], default=None)
        out += [f"{d.name}/{last}/{TRAINER_STATE}"] if last else []
    return out


class _Unusable(Exception):
    """A model directory that cannot be read; ``args[0]`` says why."""


def _json(raw: Mapping[str, Any], rel: str) -> Any:
    """The parsed JSON object at ``rel`` (None: not fetched, i.e. the file is not there)."""
    data = raw.get(rel)
    if data is None:
        return None
    if isinstance(data, Exception):
        raise _Unusable(f"cannot read {rel.split('/', 1)[1]}: {data}")
    try:
        obj = json.loads(data)
    except ValueError as e:  # JSON and UTF-8 decoding errors
        raise _Unusable(f"malformed {rel.split('/', 1)[1]}: {e}") from e
    if not isinstance(obj, dict):
        raise _Unusable(f"{rel.split('/', 1)[1]} is not a JSON object")
    return obj


def _trainer_log(state: Mapping[str, Any] | None) -> tuple[dict[int, dict[str, Any]], int | None]:
    """``log_history`` merged per step, and ``global_step``, of a ``trainer_state.json``."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in (state or {}).get("log_history") or []:
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            by_step.setdefault(entry["step"], {}).update(entry)
    step = (state or {}).get("global_step")
    return by_step, step if isinstance(step, int) and not isinstance(step, bool) else None


def _weights(files: set[str]) -> str | None:
    return next((w for w in WEIGHTS if w in files), None)


def _read_model(root: str, d: HubModelDir, raw: Mapping[str, Any], skipped: list[Skipped]) -> ModelRecord | None:
    where = storage.join(root, d.name)
    try:
        config = _json(raw, f"{d.name}/{CONFIG}")
        if config is None:
            raise _Unusable(f"missing {CONFIG}")
        try:
            arch, arch_kwargs, hparams = architecture_from_config(config)
            reference_layout(arch, arch_kwargs)
        except (UnknownArchitectureError, ValueError) as e:
            raise _Unusable(f"{CONFIG}: {e}") from e
        states = [rel for rel in _small_files(d) if rel.endswith(TRAINER_STATE)]
        log, global_step = _trainer_log(_json(raw, states[0]) if states else None)
        final_sources = [_json(raw, f"{d.name}/{ALL_RESULTS}"), _json(raw, f"{d.name}/{METRICS_FILE}")]
        checkpoints = _checkpoints(where, d, raw, log, skipped)
    except _Unusable as e:
        skipped.append(skip(where, str(e)))
        return None
    final = _weights(d.files)
    if final is not None:
        step = global_step if TRAINER_STATE in d.files and global_step is not None else (
            checkpoints[-1].epoch + 1 if checkpoints else 1)
        for c in [c for c in checkpoints if c.epoch == step]:
            skipped.append(skip(c.uri.rsplit("/", 1)[0], f"holds step {step}, the step of the top-level weights "
                                                           "(the final checkpoint)"))
        checkpoints = [c for c in checkpoints if c.epoch != step] + [
            CheckpointRecord(d.name, step, storage.join(where, final), _merged(log.get(step), *final_sources))]
    if not checkpoints:
        skipped.append(skip(where, f"no weights: neither {' nor '.join(WEIGHTS)} (sharded weights are not read)"))
        return None
    return ModelRecord(d.name, arch, arch_kwargs, hparams, sorted(checkpoints, key=lambda c: c.epoch))


def _checkpoints(where: str, d: HubModelDir, raw: Mapping[str, Any], log: Mapping[int, dict[str, Any]],
                 skipped: list[Skipped]) -> list[CheckpointRecord]:
    """The model's ``checkpoint-<step>`` directories holding weights, by step."""
    out: list[CheckpointRecord] = []
    for cname, step in sorted(d.checkpoints.items(), key=lambda item: (item[1], item[0])):
        cdir, weights = storage.join(where, cname), _weights(d.checkpoint_files[cname])
        if weights is None:
            skipped.append(skip(cdir, f"no {' or '.join(WEIGHTS)} in the checkpoint directory"))
        elif out and out[-1].epoch == step:
            skipped.append(skip(cdir, f"another checkpoint directory already holds step {step}"))
        else:
            metrics = _merged(log.get(step), _json(raw, f"{d.name}/{cname}/{METRICS_FILE}"))
            out.append(CheckpointRecord(d.name, step, storage.join(cdir, weights), metrics))
    return out


def _merged(*sources: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for source in sources:
        out.update(hub_metrics(source))
    return with_ggap(out)
