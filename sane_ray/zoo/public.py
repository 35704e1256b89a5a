"""The public model-zoo layout (modelzoos.cc): read in place, and written by ``make-zoo --format public``.

One directory per model (a Ray Tune trial; its name is the model id)::

    <model>/params.json                     flat config, keys like ``model::type``
    <model>/result.json                     JSON lines, one per ``training_iteration``
    <model>/checkpoint_000NNN/checkpoints   ``torch.save``'d state dict, no extension

Epochs: ``checkpoint_N`` is epoch N (``checkpoint_000000`` is the initialization) and
takes its metrics from the result line whose ``training_iteration`` equals N, which is
how the public zoos are written (the line for iteration N is logged after epoch N). A
checkpoint without such a line - usually epoch 0 - gets NaN metrics.

``model::type`` names a public architecture (CNN, ResNet18, ResNet34) or, for zoos that
sane-ray wrote, a registry name such as ``cnn_digits`` (see :func:`architecture_from_params`).
The writer (:func:`write_checkpoint`, :func:`finish_model`) writes exactly what the reader
reads: ``params.json`` from :func:`params_json`, one result line per epoch including
epoch 0, and ``params.json`` last, so a model directory without it is an unfinished one
(the reader skips it). A zoo that sane-ray wrote also holds ``sane-ray-zoo.json`` at its
root (the generation config, read into ``Zoo.metadata``); a public zoo needs none.
Checkpoints are ``torch.save``'d into memory, so the same tensors give the same bytes.

Listing uses one recursive listing of the root plus the small JSON files (fetched
concurrently on S3); checkpoint files are only opened when loaded.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sane_ray import storage
from sane_ray.zoo.architectures import ARCHITECTURES, UnknownArchitectureError
from sane_ray.zoo.checks import BadCheckpointError, ZooError, as_float, reference_layout, skip
from sane_ray.zoo.spec import METRICS, CheckpointRecord, ModelRecord, Skipped, Zoo, with_ggap

PARAMS = "params.json"
RESULTS = "result.json"
CHECKPOINT_FILE = "checkpoints"
ZOO_MARKER = "sane-ray-zoo.json"
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")

_RESNETS = {"resnet18": "resnet18", "resnet34": "resnet34"}
_CNNS = {1: "cnn_mnist_public", 3: "cnn_cifar_public"}
# Architecture keyword argument -> (params.json key, how its value is read).
_ARCH_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "num_classes": ("model::o_dim", int),
    "in_channels": ("model::channels_in", int),
    "activation": ("model::nlin", lambda v: str(v).lower()),
    "dropout": ("model::dropout", float),
    "width": ("model::width", int),  # sane-ray's narrow ResNets; a public ResNet zoo has none (width 64)
}
# make-zoo's training hyperparameters under the public zoos' names; others keep their own name.
_HPARAM_KEYS = {
    "lr": "optim::lr", "weight_decay": "optim::wd", "optimizer": "optim::optimizer", "init": "model::init_type",
    "batch_size": "training::batchsize", "epochs": "training::epochs_train", "task": "dataset::task",
    "split_seed": "dataset::split_seed",
}


def architecture_from_params(params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Registry name and keyword arguments for a public model's ``params.json``.

    ``model::type`` CNN maps by ``model::channels_in`` (1 -> ``cnn_mnist_public``, 3 ->
    ``cnn_cifar_public``), ResNet18/ResNet34 (any case) to ``resnet18``/``resnet34``;
    ``model::nlin`` -> ``activation`` (CNNs), ``model::o_dim`` -> ``num_classes``,
    ``model::channels_in`` -> ``in_channels``, ``model::width`` -> ``width`` (ResNets; absent in
    the public ResNet zoos, whose width is 64). Any other registry name (``cnn_digits``, as
    ``make-zoo --format public`` writes) maps to itself, taking every one of those keys
    present plus ``model::dropout`` -> ``dropout`` (the public CNNs have no dropout argument,
    so their ``model::dropout`` is not passed). Raises ``UnknownArchitectureError`` for an
    unknown type and ``ValueError`` for unusable values.
    """
    mtype = params.get("model::type")
    kind = str(mtype).lower()
    given: dict[str, Any] = {}
    for arg, (key, read) in _ARCH_KEYS.items():
        if key in params:
            try:
                given[arg] = read(params[key])
            except (TypeError, ValueError) as e:
                raise ValueError(f"unusable {key}={params[key]!r}: {e}") from e
    if kind == "cnn":
        channels = given.get("in_channels")
        if channels is None:
            raise ValueError("model::type CNN without model::channels_in: cannot tell the "
                             "1-channel (MNIST) CNN from the 3-channel (CIFAR) one")
        if channels not in _CNNS:
            raise UnknownArchitectureError(f"no public CNN with {channels} input channels (known: 1, 3)")
        return _CNNS[channels], {k: v for k, v in given.items() if k != "dropout"}
    if kind in _RESNETS:
        return _RESNETS[kind], {k: v for k, v in given.items() if k in ("num_classes", "in_channels", "width")}
    if kind in ARCHITECTURES:
        return kind, given
    raise UnknownArchitectureError(
        f"unknown architecture model::type={mtype!r} (known: CNN, ResNet18, ResNet34 or a registry name: "
        f"{', '.join(sorted(ARCHITECTURES))})")


def params_json(architecture: str, arch_kwargs: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``params.json`` of a model: its architecture and training hyperparameters in the public keys.

    Raises ``ValueError`` if the reader would rebuild another architecture from it (an
    argument with no ``params.json`` key, an upper-case activation), so nothing is written
    that reads back differently.
    """
    keys = {arg: key for arg, (key, _) in _ARCH_KEYS.items()}
    params = {"model::type": architecture, **{keys.get(k, k): v for k, v in arch_kwargs.items()},
              **{_HPARAM_KEYS.get(k, k): v for k, v in hparams.items()}}
    if architecture_from_params(params) != (architecture, dict(arch_kwargs)):
        raise ValueError(f"{architecture} {dict(arch_kwargs)} cannot be written in the public layout: "
                         f"its params.json would read back as {architecture_from_params(params)}")
    return params


def write_checkpoint(root: str, model_id: str, epoch: int, state_dict: Mapping[str, torch.Tensor],
                     s3: storage.S3Options | None = None) -> str:
    """Write ``<model_id>/checkpoint_{epoch:06d}/checkpoints`` and return its URI."""
    buf = io.BytesIO()  # in memory: torch.save names the archive after a file, so a file would change the bytes
    torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, buf)
    uri = storage.join(root, model_id, f"checkpoint_{epoch:06d}", CHECKPOINT_FILE)
    storage.write_bytes_atomic(uri, buf.getvalue(), s3)
    return uri


def finish_model(root: str, model_id: str, params: Mapping[str, Any], metrics: Mapping[int, Mapping[str, float]],
                 s3: storage.S3Options | None = None) -> None:
    """Write ``result.json`` (one line per epoch: ``training_iteration`` = epoch) and then ``params.json``."""
    lines = [json.dumps({"training_iteration": int(e), **metrics[e]}, sort_keys=True) + "\n" for e in sorted(metrics)]
    storage.write_bytes_atomic(storage.join(root, model_id, RESULTS), "".join(lines).encode(), s3)
    storage.write_bytes_atomic(storage.join(root, model_id, PARAMS),
                               json.dumps(dict(params), sort_keys=True, indent=1).encode(), s3)


def read_metadata(root: str, s3: storage.S3Options | None = None) -> dict[str, Any]:
    """The root's ``sane-ray-zoo.json`` (what generated the zoo), ``{}`` for a zoo without one."""
    uri = storage.join(root, ZOO_MARKER)
    if not storage.exists(uri, s3):
        return {}
    try:
        meta = json.loads(storage.read_bytes(uri, s3))
    except ValueError as e:
        raise ZooError(f"{uri} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ZooError(f"{uri} is not a JSON object")
    return meta


def parse_results(text: str) -> dict[int, dict[str, Any]]:
    """``result.json`` lines keyed by ``training_iteration``; raises ``ValueError`` if malformed."""
    out: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {n} is not JSON: {e}") from e
        it = rec.get("training_iteration") if isinstance(rec, dict) else None
        if not isinstance(it, int) or isinstance(it, bool):
            raise ValueError(f"line {n} has no integer training_iteration")
        out[it] = rec
    return out


@dataclass
class ModelDir:
    """What a listing shows of one model directory (nothing opened yet)."""

    name: str
    files: set[str] = field(default_factory=set)
    checkpoint_dirs: dict[str, int] = field(default_factory=dict)  # directory name -> epoch
    complete: set[str] = field(default_factory=set)  # checkpoint directories holding ``checkpoints``


def list_model_dirs(root: str, s3: storage.S3Options | None = None,
                    listing: Iterable[str] | None = None) -> dict[str, ModelDir]:
    """Model directories under ``root`` from one recursive listing (``listing``: the root's
    relative paths, directories included, if the caller already has them).

    A directory counts if it holds ``params.json``, ``result.json`` or checkpoint
    directories; anything else under the root (Ray Tune state files, ...) is ignored.
    """
    dirs: dict[str, ModelDir] = {}
    for rel in storage.find(root, s3, dirs=True) if listing is None else listing:
        parts = rel.split("/")
        if len(parts) < 2 or len(parts) > 3:
            continue
        model, name = parts[0], parts[1]
        m = _CHECKPOINT_DIR.fullmatch(name)
        if len(parts) == 2 and name in (PARAMS, RESULTS):
            dirs.setdefault(model, ModelDir(model)).files.add(name)
        elif m:
            md = dirs.setdefault(model, ModelDir(model))
            md.checkpoint_dirs[name] = int(m.group(1))
            if len(parts) == 3 and parts[2] == CHECKPOINT_FILE:
                md.complete.add(name)
    return dirs


def read_public(root: str, dirs: dict[str, ModelDir], s3: storage.S3Options | None = None) -> Zoo:
    """The zoo in the listed model directories; unusable models and checkpoints go to ``skipped``."""
    fs, base = storage.open_uri(root, s3)
    base = base.rstrip("/")
    wanted = [f"{base}/{d.name}/{f}" for d in dirs.values() for f in sorted(d.files)]
    contents = fs.cat(wanted, on_error="return") if wanted else {}
    models: list[ModelRecord] = []
    skipped: list[Skipped] = []
    for name in sorted(dirs):
        rec = _read_model(root, dirs[name], {f: contents.get(f"{base}/{name}/{f}") for f in dirs[name].files},
                          skipped)
        if rec is not None:
            models.append(rec)
    return Zoo(uri=root, format="public", models=models, skipped=skipped, metadata=read_metadata(root, s3))


class _Unusable(Exception):
    """A model directory that cannot be read; ``args[0]`` says why."""


def _parsed(raw: dict[str, Any], fname: str, parse: Callable[[bytes], Any]) -> Any:
    data = raw.get(fname)
    if data is None:
        raise _Unusable(f"missing {fname}")
    if isinstance(data, Exception):
        raise _Unusable(f"cannot read {fname}: {data}")
    try:
        return parse(data)
    except ValueError as e:  # JSON and UTF-8 decoding errors are ValueErrors
        raise _Unusable(f"malformed {fname}: {e}") from e


def _params(data: bytes) -> dict[str, Any]:
    params = json.loads(data)
    if not isinstance(params, dict):
        raise ValueError("not a JSON object")
    return params


def _read_model(root: str, d: ModelDir, raw: dict[str, Any], skipped: list[Skipped]) -> ModelRecord | None:
    where = storage.join(root, d.name)
    try:
        params = _parsed(raw, PARAMS, _params)
        try:
            arch, arch_kwargs = architecture_from_params(params)
            reference_layout(arch, arch_kwargs)
        except (UnknownArchitectureError, ValueError) as e:
            raise _Unusable(f"{PARAMS}: {e}") from e
        results = _parsed(raw, RESULTS, lambda b: parse_results(b.decode("utf-8")))
    except _Unusable as e:
        skipped.append(skip(where, str(e)))
        return None

    checkpoints: list[CheckpointRecord] = []
    for dname, epoch in sorted(d.checkpoint_dirs.items(), key=lambda item: (item[1], item[0])):
        ckpt_dir = storage.join(where, dname)
        if dname not in d.complete:
            skipped.append(skip(ckpt_dir, f"no '{CHECKPOINT_FILE}' file in the checkpoint directory"))
            continue
        if checkpoints and checkpoints[-1].epoch == epoch:
            skipped.append(skip(ckpt_dir, f"another checkpoint directory already holds epoch {epoch}"))
            continue
        line = results.get(epoch, {})
        metrics = with_ggap({m: as_float(line[m]) for m in METRICS if m in line})
        checkpoints.append(CheckpointRecord(d.name, epoch, posixpath.join(ckpt_dir, CHECKPOINT_FILE), metrics))
    if not checkpoints:
        skipped.append(skip(where, "no checkpoints"))
        return None
    return ModelRecord(d.name, arch, arch_kwargs, params, checkpoints)


def decode_checkpoint(data: bytes, ckpt: CheckpointRecord) -> Any:
    """The object ``torch.save`` stored (weights only: no arbitrary code runs)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle untrusted bytes means a bad file
        raise BadCheckpointError(ckpt.uri, f"torch.load failed: {_load_failure(e)}") from e


def _load_failure(e: Exception) -> str:
    """The useful part of torch.load's error (its weights-only message is mostly advice)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split("Check the documentation", 1)[0].split())
        return f"corrupt, or holds objects other than tensors (weights-only unpickler: {detail})"
    if isinstance(e, EOFError):
        return "unexpected end of file (empty or truncated)"
    first = (text.strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first} (corrupt or truncated file)"
