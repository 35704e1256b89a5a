"""Open any zoo by URI and load its checkpoints lazily.

:func:`open_zoo` tells the four layouts (``docs/zoos.md``) apart from listings alone, in
this order: ``manifest.parquet`` at the root -> **native**; state-dict files at the root
with a ``metrics.csv``/``metrics.parquet`` sidecar -> **flat**; then, from one recursive
listing, model directories with ``params.json`` -> **public**; model directories with
``config.json`` and ``model.safetensors``/``pytorch_model.bin`` -> **hf**. A zoo is one
layout: the first that matches is read and the rest of the root is not. Listing opens only
the small metadata files, never a checkpoint. Loading is per checkpoint
(:func:`load_checkpoint`, which decodes by file type) or per model
(:func:`load_model_checkpoints`), always through the checks in :mod:`sane_ray.zoo.checks`.
``verify=True`` runs those checks on every checkpoint up front.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from sane_ray import storage
from sane_ray.zoo import flat, hub, native, public
from sane_ray.zoo.checks import (
    DEFAULT_MAX_ABS,
    BadCheckpointError,
    ZooError,
    reference_layout,
    skip,
    validate_state_dict,
)
from sane_ray.zoo.spec import CheckpointRecord, ModelRecord, Skipped, Zoo


def open_zoo(
    uri: str,
    s3: storage.S3Options | None = None,
    verify: bool = False,
    progress: bool = False,
    max_abs: float = DEFAULT_MAX_ABS,
    workers: int = 8,
) -> Zoo:
    """Describe the zoo at ``uri`` (local path, ``file://`` or ``s3://``).

    Raises :class:`ZooError` naming the URI when there is no readable zoo there. With
    ``verify``, every checkpoint is loaded and checked (``workers`` threads, a tqdm bar
    if ``progress``); failures move to ``zoo.skipped`` and models left without
    checkpoints are dropped.
    """
    found = _locate(uri, s3)
    try:
        if found.format == "native":
            zoo = native.read_manifest(found.root, s3)
        elif found.format == "flat":
            zoo = flat.read_flat(found.root, found.names, s3)
        elif found.format == "public":
            zoo = public.read_public(found.root, public.list_model_dirs(found.root, s3, found.listing), s3)
        else:
            zoo = hub.read_hub(found.root, hub.list_model_dirs(found.listing), s3)
    except OSError as e:
        raise ZooError(f"cannot read zoo {found.root}: {e}") from e
    if verify:
        zoo = verify_zoo(zoo, s3=s3, progress=progress, max_abs=max_abs, workers=workers)
    return zoo


def check_zoo(uri: str, s3: storage.S3Options | None = None) -> str:
    """The zoo's root URI if a zoo is published there, from listings alone; else :class:`ZooError` saying why.

    What a job checks before it starts Ray: no manifest or checkpoint is read.
    """
    return _locate(uri, s3).root


@dataclass(frozen=True)
class _Found:
    """Where a zoo is and which layout it has, with the listings that told (reused to read it)."""

    root: str
    format: str  # "native", "flat", "public" or "hf"
    names: list[str]  # the root's entries
    listing: list[str] | None = None  # every path under the root, directories included (public, hf)


def _locate(uri: str, s3: storage.S3Options | None) -> _Found:
    """The layout at ``uri``, by the precedence of the module docstring; :class:`ZooError` if none."""
    try:
        root = storage.parse_uri(uri, s3).uri
    except storage.StorageError as e:
        raise ZooError(str(e)) from e
    names = _list_root(root, s3)
    if native.MANIFEST in names:
        return _Found(root, "native", names)
    if flat.is_flat(names):
        return _Found(root, "flat", names)
    try:
        listing = storage.find(root, s3, dirs=True)
    except OSError as e:
        raise ZooError(f"cannot read zoo {root}: {e}") from e
    if any(public.PARAMS in d.files for d in public.list_model_dirs(root, s3, listing).values()):
        return _Found(root, "public", names, listing)
    if hub.is_hub(hub.list_model_dirs(listing)):
        return _Found(root, "hf", names, listing)
    raise ZooError(_not_a_zoo(root, names))


def _list_root(root: str, s3: storage.S3Options | None) -> list[str]:
    fs, path = storage.open_uri(root, s3)
    try:
        if fs.isfile(path):
            raise ZooError(f"{root} is a file, not a zoo directory")
        names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError as e:
        raise ZooError(f"no zoo at {root}: it does not exist") from e
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001 - any storage failure (S3 auth, network) becomes one clear error
        raise ZooError(f"cannot list zoo root {root}: {type(e).__name__}: {e}") from e
    if not names:
        raise ZooError(f"no zoo at {root}: the directory is empty")
    return names


def _not_a_zoo(root: str, names: list[str]) -> str:
    if "models" in names:
        return (f"{root} is not a zoo: it has models/ but no {native.MANIFEST}, i.e. a native zoo whose "
                f"writer did not finish (the zoo exists only once {native.MANIFEST} is published)")
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    if any(flat.is_state_dict_file(n) for n in names):
        return (f"{root} is not a zoo: it holds state-dict files but no sidecar ({' or '.join(flat.SIDECARS)}) "
                f"naming each file's architecture and metrics, which a flat zoo needs; found: {shown}")
    return (f"{root} is not a zoo: expected one of the layouts of docs/zoos.md: native ({native.MANIFEST}), "
            f"flat (state-dict files {'/'.join(flat.SUFFIXES)} with a {' or '.join(flat.SIDECARS)} sidecar), "
            f"public (model directories containing {public.PARAMS}) or hf (model directories containing "
            f"{hub.CONFIG} and {' or '.join(hub.WEIGHTS)}); found: {shown}")


def load_checkpoint(
    model: ModelRecord, ckpt: CheckpointRecord, *, s3: storage.S3Options | None = None,
    max_abs: float = DEFAULT_MAX_ABS,
) -> dict[str, torch.Tensor]:
    """One checkpoint as float32 CPU tensors (integer buffers such as ``num_batches_tracked`` as stored).

    Raises :class:`BadCheckpointError` (path + reason) for unreadable, corrupt, non-finite,
    too large (``max_abs``) or mismatched weights, and ``UnknownArchitectureError`` if the
    model's architecture is not registered.
    """
    reference_layout(model.architecture, model.arch_kwargs)
    try:
        data = storage.read_bytes(ckpt.uri, s3)
    except storage.StorageError as e:
        raise BadCheckpointError(ckpt.uri, f"cannot read the file ({e})") from e
    # By file type: safetensors (native, hf, flat); anything else is torch.save'd bytes (.pt, .pth, .bin and
    # the public layout's extension-less ``checkpoints``), read with the weights-only unpickler.
    decode = native.decode_checkpoint if ckpt.uri.endswith(native.SUFFIX) else public.decode_checkpoint
    return validate_state_dict(_unwrapped(decode(data, ckpt)), model.architecture, model.arch_kwargs, ckpt.uri,
                               max_abs)


def _unwrapped(obj: Any) -> Any:
    """The state dict inside a training checkpoint saved as ``{"state_dict": ..., "epoch": ...}`` (Lightning,
    many research scripts); anything else as it is."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    return obj


def load_model_checkpoints(
    model: ModelRecord, *, s3: storage.S3Options | None = None, max_abs: float = DEFAULT_MAX_ABS,
) -> tuple[list[tuple[CheckpointRecord, dict[str, torch.Tensor]]], list[Skipped]]:
    """All good checkpoints of one model in epoch order, and the ones skipped (logged)."""
    good: list[tuple[CheckpointRecord, dict[str, torch.Tensor]]] = []
    bad: list[Skipped] = []
    for ckpt in model.checkpoints:
        try:
            good.append((ckpt, load_checkpoint(model, ckpt, s3=s3, max_abs=max_abs)))
        except BadCheckpointError as e:
            bad.append(skip(e.path, e.reason))
    return good, bad


def verify_zoo(
    zoo: Zoo, *, s3: storage.S3Options | None = None, progress: bool = False,
    max_abs: float = DEFAULT_MAX_ABS, workers: int = 8,
) -> Zoo:
    """A copy of ``zoo`` holding only checkpoints that load and pass the checks."""

    def check(model: ModelRecord, ckpt: CheckpointRecord) -> None:
        load_checkpoint(model, ckpt, s3=s3, max_abs=max_abs)  # tensors dropped at once: bounded memory

    jobs = [(m, c) for m in zoo.models for c in m.checkpoints]
    failed: dict[str, BadCheckpointError] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
        total=len(jobs), disable=not progress, desc="verifying checkpoints", unit="ckpt"
    ) as bar:
        futures = {pool.submit(check, m, c): c for m, c in jobs}
        for fut in as_completed(futures):
            try:
                fut.result()
            except BadCheckpointError as e:
                failed[futures[fut].uri] = e
            bar.update()

    models: list[ModelRecord] = []
    skipped = list(zoo.skipped)
    for m in zoo.models:
        skipped += [skip(c.uri, failed[c.uri].reason) for c in m.checkpoints if c.uri in failed]
        good = [c for c in m.checkpoints if c.uri not in failed]
        if good:
            models.append(dataclasses.replace(m, checkpoints=good))
        else:
            skipped.append(skip(_model_path(zoo, m), "no usable checkpoints"))
    return dataclasses.replace(zoo, models=models, skipped=skipped)


def _model_path(zoo: Zoo, model: ModelRecord) -> str:
    if zoo.format == "native":
        return storage.join(zoo.uri, "models", model.model_id)
    if zoo.format == "flat":
        return flat.model_path(zoo.uri, model.model_id)
    return storage.join(zoo.uri, model.model_id)  # public, hf: one directory per model
