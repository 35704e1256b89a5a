"""Flat folders of state dicts with a sidecar table of metrics (the layout of p-diff / RPG experiments).

Layout under the zoo root (nothing below it is read)::

    <name>.pt | .pth | .bin | .safetensors   one state dict per file (torch.save'd or safetensors)
    metrics.csv | metrics.parquet            the sidecar: one row per checkpoint file (exactly one of the two)
    zoo.json                                 optional: {"architecture": NAME, "arch_kwargs": {...}}

Sidecar columns (see ``docs/zoos.md``):

- ``file`` (required): the checkpoint's file name at the root.
- ``model``: the model id (default: the file's stem, so each file is its own model).
- ``epoch``: an integer (default: the row's position among its model's rows, from 0).
- ``architecture``: a registry name; required unless ``zoo.json`` names one for empty cells,
  whose ``arch_kwargs`` then apply too.
- ``arch.<argument>``: a keyword argument of the architecture (an empty cell: its default).
- metric columns named as :data:`~sane_ray.zoo.spec.METRICS`; a missing one is NaN.
- any other column is a hyperparameter of the model (``ModelRecord.hparams``) where all of
  the model's rows agree on it; one that varies within a model (a step counter) is not.

Rows and files that cannot be used (no file name, a file that is not there, a file no row
names, a model whose rows disagree on its architecture, an unknown architecture, an epoch
held twice) are skipped with a reason; a sidecar without its required columns is a
:class:`ZooError`. Reading needs the root listing, the sidecar and ``zoo.json``; checkpoint
files are only opened when loaded.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sane_ray import storage
from sane_ray.zoo.architectures import UnknownArchitectureError
from sane_ray.zoo.checks import ZooError, as_float, reference_layout, skip
from sane_ray.zoo.spec import METRICS, CheckpointRecord, ModelRecord, Skipped, Zoo, with_ggap

SIDECARS = ("metrics.csv", "metrics.parquet")
ZOO_JSON = "zoo.json"
SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
ARCH_PREFIX = "arch."
_READ_AS_TEXT = ("file", "model", "architecture")  # ids stay strings even when they look like numbers
_KEYS = {"file", "model", "epoch", "architecture", *METRICS}


def is_state_dict_file(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in SUFFIXES


def sidecar_name(names: Sequence[str]) -> str | None:
    """The sidecar among a root's entries (None: there is none); both of them present is a :class:`ZooError`."""
    found = [n for n in SIDECARS if n in names]
    if len(found) > 1:
        raise ZooError(f"a flat zoo has one sidecar, found both {' and '.join(found)}: remove one")
    return found[0] if found else None


def is_flat(names: Sequence[str]) -> bool:
    """Whether a root listing shows a flat zoo: state-dict files and a sidecar beside them."""
    return any(is_state_dict_file(n) for n in names) and sidecar_name(names) is not None


def model_path(root: str, model_id: str) -> str:
    """Where a skipped flat model is reported: the zoo root and the model's id (it has no directory)."""
    return f"{root} (model {model_id})"


def read_flat(root: str, names: Sequence[str], s3: storage.S3Options | None = None) -> Zoo:
    """The flat zoo whose root holds ``names``; unusable rows, files and models go to ``skipped``."""
    sidecar = sidecar_name(names)
    if sidecar is None:
        raise ZooError(f"{root} has no sidecar ({' or '.join(SIDECARS)}): a flat zoo needs one")
    defaults = _zoo_json(root, s3) if ZOO_JSON in names else {}
    rows = _sidecar_rows(storage.join(root, sidecar), has_default_arch="architecture" in defaults, s3=s3)
    skipped: list[Skipped] = []
    by_model = _rows_by_model(root, sidecar, rows, {n for n in names if is_state_dict_file(n)}, skipped)
    models = [m for m in (_model(root, mid, by_model[mid], defaults, skipped) for mid in sorted(by_model)) if m]
    return Zoo(uri=root, format="flat", models=models, skipped=skipped, metadata=defaults)


def _zoo_json(root: str, s3: storage.S3Options | None) -> dict[str, Any]:
    uri = storage.join(root, ZOO_JSON)
    try:
        meta = json.loads(storage.read_bytes(uri, s3))
    except ValueError as e:
        raise ZooError(f"{uri} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("arch_kwargs", {}), dict):
        raise ZooError(f"{uri} must be a JSON object whose arch_kwargs (if any) is an object")
    return meta


def _sidecar_rows(uri: str, has_default_arch: bool, s3: storage.S3Options | None) -> list[dict[str, Any]]:
    """The sidecar's rows as dicts; a table that does not parse or lacks required columns is a :class:`ZooError`."""
    data = storage.read_bytes(uri, s3)
    try:
        if uri.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in _READ_AS_TEXT}))
    except (pa.ArrowException, OSError) as e:
        raise ZooError(f"{uri} is not a readable {'Parquet' if uri.endswith('.parquet') else 'CSV'} table: {e}") from e
    required = ["file"] + ([] if has_default_arch else ["architecture"])
    missing = [c for c in required if c not in table.column_names]
    if missing:
        hint = "" if has_default_arch else f" (architecture may instead be given once in {ZOO_JSON})"
        raise ZooError(f"{uri} lacks required column(s): {', '.join(missing)}{hint}; "
                       f"it has: {', '.join(table.column_names) or 'none'}")
    return table.to_pylist()


def _rows_by_model(root: str, sidecar: str, rows: list[dict[str, Any]], files: set[str],
                   skipped: list[Skipped]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Usable rows grouped by model id, each with its epoch; every unusable row or unnamed file is skipped."""
    by_model: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    named: set[str] = set()
    for n, row in enumerate(rows, 1):
        if row.get("file") is None or row["file"] == "":
            skipped.append(skip(f"{storage.join(root, sidecar)} row {n}", "no file name"))
            continue
        name = str(row["file"])
        where = storage.join(root, name)
        model_id = posixpath.splitext(name)[0] if row.get("model") in (None, "") else str(row["model"])
        problem = (f"listed again in {sidecar} (row {n})" if name in named
                   else f"listed in {sidecar} (row {n}) but no such state-dict file at the zoo root" if name not in files
                   else f"model id {model_id!r} holds a '/'" if "/" in model_id else None)
        named.add(name)
        if problem is None:
            epoch = row.get("epoch")
            if epoch is None:
                epoch = len(by_model.get(model_id, ()))
            elif isinstance(epoch, float) and epoch.is_integer():
                epoch = int(epoch)
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
                problem = f"epoch {epoch!r} in {sidecar} (row {n}) is not an integer >= 0"
        if problem:
            skipped.append(skip(where, problem))
            continue
        by_model.setdefault(model_id, []).append((epoch, row))
    skipped += [skip(storage.join(root, f), f"not listed in the sidecar {sidecar}") for f in sorted(files - named)]
    return by_model


def _architecture(row: dict[str, Any], defaults: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A row's architecture and keyword arguments: its own cells over ``zoo.json``'s defaults."""
    if row.get("architecture"):
        arch, kwargs = row["architecture"], {}
    else:
        arch, kwargs = defaults.get("architecture"), dict(defaults.get("arch_kwargs", {}))
    kwargs.update({k[len(ARCH_PREFIX):]: v for k, v in row.items() if k.startswith(ARCH_PREFIX) and v is not None})
    return arch, kwargs


def _model(root: str, model_id: str, rows: list[tuple[int, dict[str, Any]]], defaults: dict[str, Any],
           skipped: list[Skipped]) -> ModelRecord | None:
    archs = [_architecture(row, defaults) for _, row in rows]
    arch, arch_kwargs = archs[0]
    try:
        if any(a != archs[0] for a in archs):
            raise ValueError("sidecar rows of this model disagree on its architecture")
        if not arch:
            raise ValueError(f"no architecture: an empty architecture cell and none in {ZOO_JSON}")
        reference_layout(arch, arch_kwargs)
    except (UnknownArchitectureError, ValueError) as e:
        skipped.append(skip(model_path(root, model_id), str(e)))
        return None
    checkpoints: list[CheckpointRecord] = []
    for epoch, row in sorted(rows, key=lambda r: r[0]):
        if checkpoints and checkpoints[-1].epoch == epoch:
            skipped.append(skip(storage.join(root, row["file"]), f"epoch {epoch} of model {model_id} is another file's"))
            continue
        metrics = with_ggap({m: as_float(row[m]) for m in METRICS if m in row})
        checkpoints.append(CheckpointRecord(model_id, epoch, storage.join(root, row["file"]), metrics))
    others = {k for _, row in rows for k in row if k not in _KEYS and not k.startswith(ARCH_PREFIX)}
    hparams = {k: rows[0][1][k] for k in sorted(others)
               if rows[0][1][k] is not None and all(row.get(k) == rows[0][1][k] for _, row in rows)}
    return ModelRecord(model_id, arch, arch_kwargs, hparams, checkpoints)
