"""Embed every checkpoint of a zoo: one row per checkpoint with its metrics and embeddings.

Two paths over the same function (:func:`embed_batch`, a few models at a time): :func:`embed_models`
runs in this process (small inputs, tests); :func:`embed_zoo` runs a Ray Data actor pool
in which each actor loads the run once (on a GPU when it is given one) and embeds a few
models per call. Memory is flat in zoo size: actors hold a batch of models, the driver
one output batch, which it writes as a Parquet part before taking the next.

Output (``out_uri``): ``part-<token>-<n>.parquet`` files, then ``embeddings.json`` (the
manifest naming the parts, written last): a reader sees a finished result or none, and
parts of an interrupted earlier attempt (another token) are never read.
:func:`read_embeddings` returns the rows as one Arrow table sorted by model and epoch.

Columns (:data:`SCHEMA`): ``model_id``, ``epoch``, ``split`` (the run's split of the
model, "" for a model the run did not see), ``architecture``, ``arch_kwargs`` and
``hparams`` (JSON), the zoo metrics (:data:`~sane_ray.zoo.spec.METRICS`, NaN where the zoo
has none), ``embedding`` (mean token latent, d_z floats), ``layer_spread`` (one float per
tokenized layer) and ``tokens`` (float32 (N, d_z) bytes with ``keep_tokens``, else null).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from sane_ray import storage
from sane_ray.cluster import ensure_ray, gpu_share, remote_args
from sane_ray.data.format import CanonicalZoo, model_from_json, model_to_json
from sane_ray.embed.encode import Embeddings, concat_tokens, embed_tokens
from sane_ray.embed.preprocess import model_tokens, population_stats, run_max_abs
from sane_ray.embed.run import Run, load_preprocessing, load_run, run_canonical, splits_of, untrained_control
from sane_ray.zoo.reader import open_zoo
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import Tokens
from sane_ray.zoo.spec import METRICS, ModelRecord

log = logging.getLogger(__name__)

EMBEDDINGS_MANIFEST = "embeddings.json"
EMBEDDINGS_FORMAT = "sane-ray/embeddings"
EMBEDDINGS_VERSION = 1

SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("epoch", pa.int64()),
        ("split", pa.string()),
        ("architecture", pa.string()),
        ("arch_kwargs", pa.string()),
        ("hparams", pa.string()),
        *[(m, pa.float64()) for m in METRICS],
        ("embedding", pa.list_(pa.float32())),
        ("layer_spread", pa.list_(pa.float32())),
        ("tokens", pa.large_binary()),
    ]
)


@dataclass
class EmbedConfig:
    """How models are embedded (defaults: the run's training window, a quarter-window halo)."""

    window_size: int | None = None  # passes of this many tokens; None: the run's training window
    halo: int | None = None  # context tokens per side; None: window_size // 4
    keep_tokens: bool = False  # also store every token latent (the paper's "full sequence")
    batch_windows: int = 256  # passes encoded at once
    epochs: list[int] | None = None  # checkpoints to embed; None: every stored epoch
    models_per_batch: int = 8  # models preprocessed, then encoded together (per actor call)
    num_actors: int = 1  # actor pool size (max)
    actor_cpus: float = 1.0
    actor_gpus: float | None = None  # per actor; None: 1 when the cluster has a GPU, else 0
    node_types: bool = False  # actors on sane_gpu_node nodes when they take a GPU, else sane_cpu_node (sane_ray.cluster)
    max_abs_weight: float | None = None  # None: the run's (checkpoints above it are skipped)
    # Set: embed with a freshly initialized SANE of the run's config from this seed instead of
    # the trained one (the untrained control).
    untrained_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_windows", "models_per_batch", "num_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"EmbedConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.actor_cpus <= 0 or (self.actor_gpus is not None and self.actor_gpus < 0):
            raise ValueError("EmbedConfig.actor_cpus must be > 0 and actor_gpus >= 0")


def _rows(model: ModelRecord, split: str, epochs: list[int], emb: Embeddings, metrics: list[dict[str, float]]) -> pa.Table:
    n = len(epochs)
    tokens = emb.tokens.cpu().numpy() if emb.tokens is not None else None
    return pa.table(
        {
            "model_id": [model.model_id] * n,
            "epoch": epochs,
            "split": [split] * n,
            "architecture": [model.architecture] * n,
            "arch_kwargs": [json.dumps(model.arch_kwargs, sort_keys=True)] * n,
            "hparams": [json.dumps(model.hparams, sort_keys=True, default=str)] * n,
            **{m: [float(x.get(m, np.nan)) for x in metrics] for m in METRICS},
            "embedding": list(emb.mean.cpu().numpy()),
            "layer_spread": list(emb.layer_spread.cpu().numpy()),
            "tokens": [t.tobytes() for t in tokens] if tokens is not None else [None] * n,
        },
        schema=SCHEMA,
    )


def _selected(model: ModelRecord, cfg: EmbedConfig) -> ModelRecord:
    if cfg.epochs is None:
        return model
    return dataclasses.replace(model, checkpoints=[c for c in model.checkpoints if c.epoch in cfg.epochs])


def _max_abs(run: Run | CanonicalZoo | None, cfg: EmbedConfig) -> float:
    return run_max_abs(run) if cfg.max_abs_weight is None else cfg.max_abs_weight


def embed_batch(
    run: Run, models: list[tuple[ModelRecord, str]], cfg: EmbedConfig, s3: storage.S3Options | None = None,
    fallback_stats: dict[str, StandardizationStats] | None = None,
) -> pa.Table:
    """Rows for the usable checkpoints of a few ``(model, split)`` (bad checkpoints are skipped and
    logged; a model without any gives no rows).

    Each model goes through :func:`~sane_ray.embed.preprocess.model_tokens` (aligned with the
    permutation of its anchor checkpoint, as the run did); models of one layout are then encoded
    in one batch. ``fallback_stats`` (from :func:`~sane_ray.embed.preprocess.population_stats`
    over the whole zoo) standardize layers of architectures the run never saw.
    """
    prep = run.preprocessing
    max_abs = _max_abs(run, cfg)
    by_layout: dict[str, list[tuple[ModelRecord, str, list, Tokens]]] = {}
    for model, split in models:
        lid = prep.layout_id(model.architecture, model.arch_kwargs)
        mt = model_tokens(run, model, _selected(model, cfg).epochs, s3=s3, max_abs=max_abs,
                          fallback_stats=(fallback_stats or {}).get(lid))
        for skipped in mt.skipped:
            log.warning("skipping %s: %s", skipped.path, skipped.reason)
        if mt.tokens is not None:
            by_layout.setdefault(lid, []).append((model, split, mt.good, mt.tokens))
    tables = [SCHEMA.empty_table()]
    for group in by_layout.values():
        emb = embed_tokens(run, concat_tokens([t for *_, t in group]), window_size=cfg.window_size, halo=cfg.halo,
                           keep_tokens=cfg.keep_tokens, batch_windows=cfg.batch_windows)
        first = 0
        for model, split, good, _ in group:
            part = Embeddings(*(None if v is None else v[first : first + len(good)]
                                for v in (emb.mean, emb.layer_spread, emb.std, emb.tokens)))
            tables.append(_rows(model, split, [c.epoch for c, _ in good], part, [c.metrics for c, _ in good]))
            first += len(good)
    return pa.concat_tables(tables)


def embed_models(
    run: Run, models: Iterable[ModelRecord], splits: dict[str, str] | None = None,
    cfg: EmbedConfig | None = None, s3: storage.S3Options | None = None,
) -> pa.Table:
    """In-process path: rows of all ``models`` (``splits``: model id -> split; default the run's)."""
    cfg = cfg or EmbedConfig()
    models = list(models)
    splits = run.splits() if splits is None else splits
    run = _model_for(run, cfg)
    unknown = population_stats(run, [_selected(m, cfg) for m in models], s3, _max_abs(run, cfg))
    batch = cfg.models_per_batch
    tables = [
        embed_batch(run, [(m, splits.get(m.model_id, "")) for m in models[i : i + batch]], cfg, s3, unknown)
        for i in range(0, len(models), batch)
    ]
    return _sorted(pa.concat_tables([SCHEMA.empty_table(), *tables]))


def _model_for(run: Run, cfg: EmbedConfig) -> Run:
    return run if cfg.untrained_seed is None else untrained_control(run, cfg.untrained_seed)


class ZooEmbedder:
    """Ray Data actor: loads the run once, then embeds a batch of models per call."""

    def __init__(self, run_uri: str, cfg: dict[str, Any], s3: storage.S3Options | None, unknown_stats: dict[str, Any]):
        self.cfg = EmbedConfig(**cfg)
        self.s3 = s3
        self.unknown = {lid: StandardizationStats.from_dict(d) for lid, d in unknown_stats.items()}
        self.run = _model_for(load_run(run_uri), self.cfg)  # on the actor's GPU when Ray gave it one

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        models = [(model, extra["split"]) for model, extra in map(model_from_json, batch["item"])]
        return embed_batch(self.run, models, self.cfg, self.s3, self.unknown)


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("model_id", "ascending"), ("epoch", "ascending")])


def embed_zoo(
    run_uri: str,
    zoo_uri: str,
    out_uri: str,
    cfg: EmbedConfig | None = None,
    splits: dict[str, str] | None = None,
    s3: storage.S3Options | None = None,
) -> int:
    """Embed every checkpoint of the zoo at ``zoo_uri`` with the run at ``run_uri`` into
    ``out_uri`` (see the module doc); returns the number of rows written.

    ``splits`` (model id -> split) defaults to the run's own split when the zoo is the run's
    zoo, else every split is "". Attaches to Ray, or starts it, as every job does (:mod:`sane_ray.cluster`).
    """
    ensure_ray()
    cfg = cfg or EmbedConfig()
    s3 = (s3 or storage.S3Options()).resolved()
    out_uri = storage.parse_uri(out_uri, s3).uri
    zoo = open_zoo(zoo_uri, s3=s3)
    canonical = run_canonical(run_uri, s3)
    if splits is None:
        same_zoo = canonical is not None and canonical.zoo_uri == zoo.uri
        splits = splits_of(canonical) if same_zoo else {}
        if not same_zoo:
            log.info("zoo %s is not the run's zoo: rows get no split", zoo.uri)
    prep = load_preprocessing(run_uri, s3)
    unknown = population_stats(prep, [_selected(m, cfg) for m in zoo.models], s3, _max_abs(canonical, cfg))
    gpus = gpu_share(1.0) if cfg.actor_gpus is None else cfg.actor_gpus
    items = [{"item": model_to_json(m, split=splits.get(m.model_id, ""))} for m in zoo.models]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // cfg.models_per_batch)))
    ds = ds.map_batches(
        ZooEmbedder,
        batch_size=cfg.models_per_batch,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
        **remote_args("gpu" if gpus else "cpu", cfg.actor_cpus, gpus, node_types=cfg.node_types),
        fn_constructor_kwargs={"run_uri": run_uri, "cfg": asdict(cfg), "s3": s3,
                               "unknown_stats": {lid: st.to_dict() for lid, st in unknown.items()}},
    )
    token = uuid.uuid4().hex[:8]
    parts, rows = [], 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows == 0:
            continue
        name = f"part-{token}-{len(parts):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(batch.cast(SCHEMA), buf)
        storage.write_bytes_atomic(storage.join(out_uri, name), buf.getvalue(), s3)
        parts.append(name)
        rows += batch.num_rows
    manifest = {
        "format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "run_uri": run_uri, "zoo_uri": zoo.uri,
        "config": asdict(cfg), "rows": rows, "parts": parts,
    }
    storage.write_bytes_atomic(storage.join(out_uri, EMBEDDINGS_MANIFEST), json.dumps(manifest, indent=1).encode(), s3)
    log.info("embedded %d checkpoints of %s into %s", rows, zoo.uri, out_uri)
    return rows


def read_embeddings(uri: str, s3: storage.S3Options | None = None) -> pa.Table:
    """The rows written by :func:`embed_zoo` at ``uri``, sorted by model id and epoch."""
    where = storage.join(uri, EMBEDDINGS_MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(where, s3))
        if (manifest.get("format"), manifest.get("version")) != (EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION):
            raise ValueError(f"not a {EMBEDDINGS_FORMAT} version {EMBEDDINGS_VERSION} manifest")
        parts = list(manifest["parts"])
    except storage.StorageError as e:
        raise FileNotFoundError(f"no finished embeddings at {uri} ({e})") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: unreadable embeddings manifest ({e})") from e
    tables = [SCHEMA.empty_table()]
    for name in parts:
        part = storage.join(uri, name)
        try:
            tables.append(pq.read_table(io.BytesIO(storage.read_bytes(part, s3)), schema=SCHEMA))
        except (storage.StorageError, pa.ArrowInvalid) as e:
            raise ValueError(f"{part}: unreadable embeddings part ({e})") from e
    return _sorted(pa.concat_tables(tables))


def embedding_matrix(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """A list<float32> column (``embedding``, ``layer_spread``) as a (rows, dim) float32 array."""
    col = table.column(column).combine_chunks()
    width = len(col[0]) if len(col) else 0
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width).astype(np.float32, copy=False)
