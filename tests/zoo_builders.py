"""Tiny zoos in every layout (native, public, hf, flat) for tests: registry architectures, random
weights drifting per epoch, synthetic metrics. Nothing is trained, so building a zoo takes milliseconds.

Every builder returns ``{model_id: [state_dict per epoch]}`` (epoch 0 first) so tests can
compare what a reader loads with what was written; metrics are :func:`fake_metrics`.
"""

from __future__ import annotations

import io
import json
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from safetensors.torch import save as safetensors_save

from sane_ray import storage
from sane_ray.zoo import native
from sane_ray.zoo.architectures import build_model

# params.json entries that select each public architecture (see sane_ray.zoo.public).
PUBLIC_TYPES: dict[str, dict[str, Any]] = {
    "cnn_mnist_public": {"model::type": "CNN", "model::channels_in": 1},
    "cnn_cifar_public": {"model::type": "CNN", "model::channels_in": 3},
    "resnet18": {"model::type": "Resnet18", "model::channels_in": 3},
}


def root_uri(where: str, tmp_path: Any, s3: dict[str, Any] | None, name: str = "zoo") -> str:
    """A fresh zoo root: a local directory, or a prefix in the ``s3`` fixture's bucket."""
    return f"s3://{s3['bucket']}/{name}" if where == "s3" else str(tmp_path / name)


def trajectory(arch: str, arch_kwargs: dict[str, Any] | None = None, seed: int = 0, epochs: int = 2,
               step: float = 0.05) -> list[dict[str, torch.Tensor]]:
    """State dicts for epochs 0..``epochs``: a seeded initialization plus a random walk of the parameters."""
    torch.manual_seed(seed)
    model = build_model(arch, **(arch_kwargs or {}))
    params = {k for k, _ in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed + 10_000)
    states = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for _ in range(epochs):
        prev = states[-1]
        nxt = {}
        for k, v in prev.items():
            if k in params:
                nxt[k] = v + step * torch.randn(v.shape, generator=gen)
            elif k.endswith("num_batches_tracked"):
                nxt[k] = v + 10
            else:
                nxt[k] = v.clone()
        states.append(nxt)
    return states


def fake_metrics(seed: int, epoch: int) -> dict[str, float]:
    """Deterministic, plausible metrics: accuracy rises with the epoch and differs per model."""
    test = min(0.95, 0.1 + 0.2 * epoch + 0.01 * seed)
    return {"train_acc": min(0.99, test + 0.03), "test_acc": test, "val_acc": test - 0.01,
            "train_loss": 2.3 / (1 + epoch), "test_loss": 2.4 / (1 + epoch)}


def build_native_zoo(root: str, n_models: int = 3, epochs: int = 2, archs: Sequence[str] = ("cnn_digits",),
                     metadata: dict[str, Any] | None = None, s3: storage.S3Options | None = None,
                     seed_offset: int = 0) -> dict[str, list[dict[str, torch.Tensor]]]:
    """A published native zoo; model ``m{i:03d}`` uses ``archs[i % len(archs)]`` and seed ``i + seed_offset``
    (another offset: other models under the same ids, as two make-zoo seeds give)."""
    rows, states = [], {}
    for i in range(n_models):
        model_id, arch = f"m{i:03d}", archs[i % len(archs)]
        states[model_id] = trajectory(arch, seed=i + seed_offset, epochs=epochs)
        for epoch, sd in enumerate(states[model_id]):
            rows.append(native.write_checkpoint(
                root, model_id, epoch, sd, fake_metrics(i, epoch), arch, {},
                {"seed": i, "lr": 1e-3}, s3=s3))
    native.publish_manifest(root, rows, metadata or {"source": "zoo_builders"}, s3=s3)
    return states


def public_model_name(i: int) -> str:
    return f"NN_tune_trainable_{i:05d}_{i}_seed={i}"


def public_params(seed: int, arch: str = "cnn_mnist_public", nlin: str = "tanh", epochs: int = 2) -> dict[str, Any]:
    return {**PUBLIC_TYPES[arch], "model::nlin": nlin, "model::init_type": "kaiming_uniform",
            "model::o_dim": 10, "model::dropout": 0.0, "optim::optimizer": "adam", "optim::lr": 3e-4,
            "optim::wd": 0.0, "seed": seed, "training::epochs_train": epochs}


def result_lines(seed: int, epochs: int) -> bytes:
    """``result.json`` as the public zoos write it: iteration N carries epoch N's metrics, no line for epoch 0."""
    lines = [{"training_iteration": e, **fake_metrics(seed, e), "time_this_iter_s": 0.5, "done": e == epochs}
             for e in range(1, epochs + 1)]
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_public_model(root: str, name: str, params: dict[str, Any], results: bytes,
                       states: Sequence[dict[str, torch.Tensor]], s3: storage.S3Options | None = None) -> None:
    """One model directory in the public layout (``checkpoint_{epoch:06d}/checkpoints``)."""
    put(root, f"{name}/params.json", json.dumps(params).encode(), s3)
    put(root, f"{name}/result.json", results, s3)
    for epoch, sd in enumerate(states):
        put(root, f"{name}/checkpoint_{epoch:06d}/checkpoints", torch_bytes(sd), s3)


def build_public_zoo(root: str, n_models: int = 3, epochs: int = 2, arch: str = "cnn_mnist_public",
                     nlin: str = "tanh",
                     s3: storage.S3Options | None = None) -> dict[str, list[dict[str, torch.Tensor]]]:
    """A public-layout zoo of ``n_models`` models named by :func:`public_model_name`."""
    states = {}
    for i in range(n_models):
        name = public_model_name(i)
        params = public_params(i, arch, nlin, epochs)
        kwargs = {"activation": nlin} if arch.startswith("cnn") else {}
        states[name] = trajectory(arch, kwargs, seed=i, epochs=epochs)
        write_public_model(root, name, params, result_lines(i, epochs), states[name], s3)
    put(root, "experiment_state-2022.json", b"{}", s3)  # Tune's own files sit beside the models
    return states


def hf_model_name(i: int) -> str:
    return f"hf-model-{i:03d}"


def hf_config(arch: str, arch_kwargs: dict[str, Any], **hparams: Any) -> dict[str, Any]:
    """``config.json`` naming a registry architecture with sane-ray's keys, plus HF's usual bookkeeping."""
    return {"sane_ray_architecture": arch, "sane_ray_arch_kwargs": arch_kwargs, "transformers_version": "4.46.0",
            **hparams}


def write_hf_model(root: str, name: str, config: dict[str, Any], states: Sequence[dict[str, torch.Tensor]],
                   metrics: Sequence[dict[str, float]] | None = None, weights: str = "model.safetensors",
                   s3: storage.S3Options | None = None) -> None:
    """One model directory in the HF layout: ``states[:-1]`` as ``checkpoint-<epoch>/``, the last one as the
    top-level weights (so its step, without a trainer state, is one past the last checkpoint: ``len(states) - 1``),
    each with ``metrics[epoch]`` as the ``metrics.json`` beside it."""
    encode = state_bytes if weights.endswith(".safetensors") else torch_bytes
    put(root, f"{name}/config.json", json.dumps(config).encode(), s3)
    for epoch, sd in enumerate(states):
        where = name if epoch == len(states) - 1 else f"{name}/checkpoint-{epoch}"
        put(root, f"{where}/{weights}", encode(sd), s3)
        if metrics is not None:
            put(root, f"{where}/metrics.json", json.dumps(metrics[epoch]).encode(), s3)


def build_hf_zoo(root: str, n_models: int = 3, epochs: int = 2, arch: str = "cnn_digits",
                 s3: storage.S3Options | None = None) -> dict[str, list[dict[str, torch.Tensor]]]:
    """An hf-layout zoo of ``n_models`` models named by :func:`hf_model_name`, activations alternating
    relu/tanh, epochs 0..``epochs`` (``checkpoint-0`` is the initialization)."""
    states = {}
    for i in range(n_models):
        kwargs = {"activation": ("relu", "tanh")[i % 2]}
        states[hf_model_name(i)] = trajectory(arch, kwargs, seed=i, epochs=epochs)
        write_hf_model(root, hf_model_name(i), hf_config(arch, kwargs, seed=i, learning_rate=1e-3),
                       states[hf_model_name(i)], [fake_metrics(i, e) for e in range(epochs + 1)], s3=s3)
    return states


def flat_file(model_id: str, epoch: int) -> str:
    """File name of a flat zoo's checkpoint: safetensors for even epochs, torch.save'd ``.pt`` for odd ones."""
    return f"{model_id}_e{epoch}" + (".safetensors" if epoch % 2 == 0 else ".pt")


def write_sidecar(root: str, rows: Sequence[dict[str, Any]], name: str = "metrics.csv",
                  s3: storage.S3Options | None = None) -> None:
    """A flat zoo's sidecar table (CSV or Parquet by ``name``) from row dicts."""
    table = pa.Table.from_pylist(list(rows))
    buf = io.BytesIO()
    if name.endswith(".parquet"):
        pq.write_table(table, buf)
    else:
        pacsv.write_csv(table, buf)
    put(root, name, buf.getvalue(), s3)


def build_flat_zoo(root: str, n_models: int = 3, epochs: int = 2, arch: str = "cnn_digits",
                   sidecar: str = "metrics.csv", s3: storage.S3Options | None = None,
                   ) -> dict[str, list[dict[str, torch.Tensor]]]:
    """A flat zoo of the same models as :func:`build_hf_zoo` (ids, weights, metrics): files named by
    :func:`flat_file`, the architecture in ``zoo.json``, the activation in an ``arch.activation`` column."""
    states, rows = {}, []
    for i in range(n_models):
        model_id, activation = hf_model_name(i), ("relu", "tanh")[i % 2]
        states[model_id] = trajectory(arch, {"activation": activation}, seed=i, epochs=epochs)
        for epoch, sd in enumerate(states[model_id]):
            name = flat_file(model_id, epoch)
            put(root, name, state_bytes(sd) if name.endswith(".safetensors") else torch_bytes(sd), s3)
            rows.append({"file": name, "model": model_id, "epoch": epoch, "arch.activation": activation,
                         "seed": i, "learning_rate": 1e-3, **fake_metrics(i, epoch)})
    put(root, "zoo.json", json.dumps({"architecture": arch}).encode(), s3)
    write_sidecar(root, rows, sidecar, s3)
    return states


def state_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    return safetensors_save({k: v.contiguous() for k, v in sd.items()})


def put(root: str, rel: str, data: bytes, s3: storage.S3Options | None = None) -> None:
    storage.write_bytes_atomic(storage.join(root, rel), data, s3)


def remove(root: str, rel: str, s3: storage.S3Options | None = None) -> None:
    fs, path = storage.open_uri(storage.join(root, rel), s3)
    fs.rm(path)


def export_untrained_run(cfg: Any, run_uri: str) -> Any:
    """Prepare ``cfg`` (a DataConfig) and export an untrained tiny SANE for it at ``run_uri``:
    a run whose preprocessing is real and whose model is a seeded initialization. Returns the prepared data."""
    import dataclasses

    from sane_ray.data import prepare_data
    from sane_ray.embed.preprocess import run_export_files
    from sane_ray.model import SaneModel, tiny
    from sane_ray.model.export import export_model
    from sane_ray.pretrain_config import model_for_data

    prepared = prepare_data(cfg)
    model_cfg = model_for_data(dataclasses.replace(tiny(), d_model=32, d_z=8), cfg.token_size, cfg.window_size,
                               prepared.pad_position)
    torch.manual_seed(0)
    export_model(SaneModel(model_cfg).state_dict(), model_cfg, run_uri, run_export_files(prepared))
    return prepared


def record_local_opens(monkeypatch: Any) -> list[str]:
    """The paths every local file open goes to from now on (what a lazy listing may read)."""
    import fsspec.implementations.local

    opened: list[str] = []
    real_open = fsspec.implementations.local.LocalFileSystem._open
    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "_open",
                        lambda self, path, *a, **kw: opened.append(path) or real_open(self, path, *a, **kw))
    return opened
