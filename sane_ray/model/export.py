"""The trained model as plain files, loadable without Ray, a process group or the zoo.

A run directory (local path or ``s3://``) receives ``model.safetensors`` (the full,
unsharded state dict), ``sane_config.json`` (the :class:`SaneConfig`), any extra files
a caller adds (pretraining adds what preprocessing a new model needs: see
:mod:`sane_ray.embed.preprocess`), and last ``checksums.json`` with every file's size
and SHA-256 (:mod:`sane_ray.checksums`). A reader that finds the checksums therefore
finds a complete export, and :func:`read_export` tells a missing, truncated or altered
file from an intact one and names it. :func:`load_sane` is the one way back to a model.

Only ``storage``, ``checksums`` and ``config`` are imported from outside ``model/``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sane_ray import storage
from sane_ray.checksums import DIGEST_FILE, IntegrityError, verify_digests, write_digests
from sane_ray.config import ConfigError, from_dict
from sane_ray.model.config import SaneConfig
from sane_ray.model.sane import SaneModel

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "sane_config.json"
RESERVED = (MODEL_FILE, CONFIG_FILE, DIGEST_FILE)


class ExportError(ValueError):
    """An export that cannot be read (the one-line message names the file and what is wrong)."""


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A safetensors file of CPU copies of ``tensors`` (the export's one tensor format)."""
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def tensors_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tensors_to_bytes`; ``where`` names the file in the error."""
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise ExportError(f"{where}: not a safetensors file ({e})") from e


def export_model(
    state_dict: Mapping[str, torch.Tensor],
    cfg: SaneConfig,
    uri: str,
    extra_files: Mapping[str, bytes] | None = None,
) -> None:
    """Write the full state dict, the config, ``extra_files`` (name -> bytes) and their checksums under ``uri``.

    Each file is written atomically; ``checksums.json`` is written last, so the export
    exists for readers only once every file is complete.
    """
    extra = dict(extra_files or {})
    reserved = set(RESERVED) & set(extra)
    if reserved:
        raise ValueError(f"extra export files may not be named {sorted(reserved)}")
    files = {
        **extra,
        CONFIG_FILE: json.dumps(dataclasses.asdict(cfg), indent=2).encode(),
        MODEL_FILE: tensors_to_bytes(state_dict),
    }
    storage.makedirs(uri)
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(uri, name), data)
    write_digests(uri, files, known=files)


def read_export(uri: str) -> dict[str, bytes]:
    """Every file of the export at ``uri`` (name -> bytes), verified against its checksums."""
    try:
        files = verify_digests(uri)
    except IntegrityError as e:
        raise ExportError(f"cannot read the SANE export at {uri}: {e}") from e
    missing = [n for n in (MODEL_FILE, CONFIG_FILE) if n not in files]
    if missing:
        raise ExportError(f"{storage.join(uri, missing[0])}: not part of the export (not in its {DIGEST_FILE})")
    return files


def sane_from_files(files: Mapping[str, bytes], uri: str, device: str | torch.device = "cpu") -> SaneModel:
    """The model held by an export's files (from :func:`read_export`), in eval mode on ``device``."""
    config_uri, model_uri = storage.join(uri, CONFIG_FILE), storage.join(uri, MODEL_FILE)
    try:
        cfg = from_dict(SaneConfig, json.loads(files[CONFIG_FILE]))
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError, TypeError, ValueError) as e:
        raise ExportError(f"{config_uri}: invalid SANE config ({e})") from e
    state = tensors_from_bytes(files[MODEL_FILE], model_uri)
    model = SaneModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ExportError(f"{model_uri} does not match {config_uri}: {' '.join(first[:3])}") from e
    return model.to(device).eval()


def load_sane(uri: str, device: str | torch.device = "cpu") -> SaneModel:
    """The exported SANE model in ``uri`` (a run directory), in eval mode on ``device``."""
    return sane_from_files(read_export(uri), uri, device)
