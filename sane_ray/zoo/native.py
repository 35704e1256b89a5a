"""sane-ray's native zoo format: safetensors checkpoints plus one Parquet manifest.

Layout under the zoo root::

    models/<model_id>/epoch_<EEEE>.safetensors
    manifest.parquet      one row per checkpoint; written last

A zoo exists only once ``manifest.parquet`` exists, and it is published after every
checkpoint it lists has been written, so a crashed writer leaves no zoo a reader would
trust. Each row carries the checkpoint's SHA-256, so truncation is caught on load.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import save as safetensors_save

from sane_ray import storage
from sane_ray.zoo.spec import METRICS, with_ggap

MANIFEST = "manifest.parquet"
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
    return f"models/{model_id}/epoch_{epoch:04d}.safetensors"


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
    data = safetensors_save(tensors, metadata={"model_id": model_id, "epoch": str(epoch)})
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
