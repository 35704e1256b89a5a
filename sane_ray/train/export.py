"""The trained model as two plain files, loadable without Ray or a process group.

A run directory (local path or ``s3://``) receives ``model.safetensors`` (the full,
unsharded state dict) and ``sane_config.json`` (the :class:`SaneConfig`), plus any
extra files a caller adds (e.g. the standardization statistics needed to turn decoded
tokens back into weights). :func:`load_sane` is the one way back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sane_ray import storage
from sane_ray.config import ConfigError, from_dict
from sane_ray.model.config import SaneConfig
from sane_ray.model.sane import SaneModel

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "sane_config.json"


def export_model(
    state_dict: Mapping[str, torch.Tensor],
    cfg: SaneConfig,
    uri: str,
    extra_files: Mapping[str, bytes] | None = None,
) -> None:
    """Write the full state dict, the config and ``extra_files`` (name -> bytes) under ``uri``.

    Each file is written atomically; the weights are written last so a reader that
    finds them also finds the config and the extra files.
    """
    reserved = {MODEL_FILE, CONFIG_FILE} & set(extra_files or {})
    if reserved:
        raise ValueError(f"extra export files may not be named {sorted(reserved)}")
    storage.makedirs(uri)
    for name, data in (extra_files or {}).items():
        storage.write_bytes_atomic(storage.join(uri, name), data)
    config_json = json.dumps(dataclasses.asdict(cfg), indent=2).encode()
    storage.write_bytes_atomic(storage.join(uri, CONFIG_FILE), config_json)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    storage.write_bytes_atomic(storage.join(uri, MODEL_FILE), save_safetensors(tensors, metadata={"format": "pt"}))


def load_sane(uri: str, device: str | torch.device = "cpu") -> SaneModel:
    """The exported SANE model in ``uri`` (a run directory), in eval mode on ``device``."""
    config_uri = storage.join(uri, CONFIG_FILE)
    try:
        cfg = from_dict(SaneConfig, json.loads(storage.read_bytes(config_uri)))
    except (json.JSONDecodeError, ConfigError) as e:
        raise ValueError(f"invalid SANE config {config_uri}: {e}") from e
    state = load_safetensors(storage.read_bytes(storage.join(uri, MODEL_FILE)))
    model = SaneModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{storage.join(uri, MODEL_FILE)} does not match {config_uri}: {e}") from e
    return model.to(device).eval()
