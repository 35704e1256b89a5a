"""sane-ray's native zoo format: safetensors checkpoints plus one Parquet manifest.

Layout under the zoo root::

    models/<model_id>/epoch_<EEEE>.safetensors
    manifest.parquet      one row per checkpoint; written last

A zoo exists only once ``manifest.parquet`` exists, and it is published after every
checkpoint it lists has been written, so a crashed writer leaves no zoo a reader would
trust. What such a writer leaves under the root is no part of the zoo:
:func:`unlisted_files` names it (``sane-ray zoo info --check``), and the next writer
removes it once its own manifest is published. Each row carries the checkpoint's SHA-256, so truncation is caught on load.
Reading a zoo needs the manifest alone; checkpoint files are opened only when loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from sane_ray import lease, storage
from sane_ray.zoo.architectures import UnknownArchitectureError
from sane_ray.zoo.checks import BadCheckpointError, ZooError, as_float, reference_layout, skip
from sane_ray.zoo.spec import METRICS, CheckpointRecord, ModelRecord, Skipped, Zoo, with_ggap

MANIFEST = "manifest.parquet"
SUFFIX = ".safetensors"
FORMAT_VERSION = "1"

MANIFEST_SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("epoch", pa.int32()),
        ("path", pa.string()),  # relative to the zoo root
        ("architecture", pa.string()),
        ("arch_kwargs", pa.string()),  # JSON
        ("hparams", pa.string()),  # JSON
        ("sha256", pa.string()),
        ("nbytes", pa.int64()),
        *[(m, pa.float64()) for m in METRICS],
    ]
)


def checkpoint_path(model_id: str, epoch: int) -> str:
    """Relative path of a checkpoint inside a native zoo."""
    return f"models/{model_id}/epoch_{epoch:04d}{SUFFIX}"


def write_checkpoint(
    root: str,
    model_id: str,
    epoch: int,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, float],
    architecture: str,
    arch_kwargs: dict[str, Any] | None = None,
    hparams: dict[str, Any] | None = None,
    s3: storage.S3Options | None = None,
) -> dict[str, Any]:
    """Write one checkpoint file and return its manifest row (not yet published)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # One metadata key: safetensors writes a multi-key map in arbitrary order, and the same
    # checkpoint must give the same bytes (and SHA-256) wherever and whenever it is written.
    data = safetensors_save(tensors, metadata={"sane_ray": json.dumps({"model_id": model_id, "epoch": int(epoch)})})
    rel = checkpoint_path(model_id, epoch)
    storage.write_bytes_atomic(storage.join(root, rel), data, s3)
    return {
        "model_id": model_id,
        "epoch": int(epoch),
        "path": rel,
        "architecture": architecture,
        "arch_kwargs": json.dumps(arch_kwargs or {}, sort_keys=True),
        "hparams": json.dumps(hparams or {}, sort_keys=True),
        "sha256": hashlib.sha256(data).hexdigest(),
        "nbytes": len(data),
        **with_ggap(metrics),
    }


def publish_manifest(
    root: str, rows: Iterable[dict[str, Any]], metadata: dict[str, Any] | None = None,
    s3: storage.S3Options | None = None,
) -> str:
    """Publish the manifest (sorted by model id, epoch): the step that makes the zoo exist."""
    rows = sorted(rows, key=lambda r: (r["model_id"], r["epoch"]))
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({
        "sane_ray.format": "native",
        "sane_ray.version": FORMAT_VERSION,
        "sane_ray.metadata": json.dumps(metadata or {}, sort_keys=True),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = storage.join(root, MANIFEST)
    storage.write_bytes_atomic(uri, buf.getvalue(), s3)
    return uri


# ---------------------------------------------------------------- reader


def manifest_paths(root: str, s3: storage.S3Options | None = None) -> list[str]:
    """The checkpoint paths (relative to ``root``) a published manifest lists, skipped models included."""
    uri = storage.join(root, MANIFEST)
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri, s3)), columns=["path"]).column("path").to_pylist()
    except (pa.ArrowException, KeyError) as e:
        raise ZooError(f"{uri} is not a readable Parquet manifest: {e}") from e


def unlisted_files(root: str, s3: storage.S3Options | None = None) -> list[str]:
    """Files under a native zoo's root (relative paths, sorted) that its manifest does not name.

    The manifest and a writer's lease belong to the zoo; anything else unnamed was left
    by an interrupted or replaced writer.
    """
    named = set(manifest_paths(root, s3)) | {MANIFEST, lease.LEASE_FILE}
    return [p for p in storage.find(root, s3) if p not in named]


def read_manifest(root: str, s3: storage.S3Options | None = None) -> Zoo:
    """The zoo described by ``root/manifest.parquet``; no checkpoint file is opened.

    Models whose architecture is unknown or whose JSON columns do not parse are left out
    and reported in ``Zoo.skipped``; a manifest that is unreadable, lacks columns or has
    another format version raises :class:`ZooError`.
    """
    uri = storage.join(root, MANIFEST)
    try:
        data = storage.read_bytes(uri, s3)
    except storage.StorageError as e:
        raise ZooError(f"cannot read the manifest of native zoo {root}: {e}") from e
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise ZooError(f"{uri} is not a readable Parquet manifest: {e}") from e
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("sane_ray.format") != "native":
        raise ZooError(f"{uri} is not a sane-ray native manifest (no sane_ray.format=native schema metadata)")
    if meta.get("sane_ray.version") != FORMAT_VERSION:
        raise ZooError(f"{uri} has manifest format version {meta.get('sane_ray.version')!r}; "
                       f"this sane-ray reads version {FORMAT_VERSION!r}")
    missing = [c for c in MANIFEST_SCHEMA.names if c not in table.column_names]
    if missing:
        raise ZooError(f"{uri} lacks manifest columns: {', '.join(missing)}")
    nulls = [c for c in ("model_id", "epoch", "path", "architecture") if table.column(c).null_count]
    if nulls:
        raise ZooError(f"{uri} has empty values in required columns: {', '.join(nulls)}")
    try:
        metadata = json.loads(meta.get("sane_ray.metadata", "{}"))
    except json.JSONDecodeError as e:
        raise ZooError(f"{uri}: malformed sane_ray.metadata JSON: {e}") from e

    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in table.select(MANIFEST_SCHEMA.names).to_pylist():
        by_model.setdefault(row["model_id"], []).append(row)
    models: list[ModelRecord] = []
    skipped: list[Skipped] = []
    for model_id in sorted(by_model):
        rec = _model_from_rows(root, model_id, by_model[model_id])
        (skipped if isinstance(rec, Skipped) else models).append(rec)
    return Zoo(uri=root, format="native", models=models, skipped=skipped, metadata=metadata)


def _model_from_rows(root: str, model_id: str, rows: list[dict[str, Any]]) -> ModelRecord | Skipped:
    where = storage.join(root, "models", model_id)
    first = rows[0]
    if any((r["architecture"], r["arch_kwargs"]) != (first["architecture"], first["arch_kwargs"]) for r in rows):
        return skip(where, "manifest rows of this model disagree on its architecture")
    try:
        arch_kwargs = json.loads(first["arch_kwargs"] or "{}")
        hparams = json.loads(first["hparams"] or "{}")
    except json.JSONDecodeError as e:
        return skip(where, f"malformed arch_kwargs/hparams JSON in the manifest: {e}")
    try:
        reference_layout(first["architecture"], arch_kwargs)
    except (UnknownArchitectureError, ValueError) as e:
        return skip(where, str(e))
    checkpoints = sorted(
        (CheckpointRecord(
            model_id=model_id,
            epoch=int(r["epoch"]),
            uri=storage.join(root, r["path"]),
            metrics=with_ggap({m: as_float(r[m]) for m in METRICS}),
            sha256=r["sha256"],
        ) for r in rows),
        key=lambda c: c.epoch,
    )
    return ModelRecord(model_id, first["architecture"], arch_kwargs, hparams, checkpoints)


def decode_checkpoint(data: bytes, ckpt: CheckpointRecord) -> dict[str, torch.Tensor]:
    """Tensors of a native checkpoint's bytes, after checking them against the manifest's SHA-256."""
    if ckpt.sha256 and hashlib.sha256(data).hexdigest() != ckpt.sha256:
        raise BadCheckpointError(
            ckpt.uri, f"SHA-256 mismatch ({len(data)} bytes): the file is truncated or was modified")
    try:
        return safetensors_load(data)
    except SafetensorError as e:
        raise BadCheckpointError(ckpt.uri, f"not a valid safetensors file: {e}") from e
