"""``prepare_data(cfg)``: the one call the pretraining job makes to get its datasets.

Cheap checks first (settings, zoo listing, splits, window size against the sequence
lengths), then the canonical tokenized zoo (reused from the cache when the zoo and the
preprocessing settings are unchanged, built otherwise), then one lazy window dataset
per split. Nothing here collects weights on the driver: the zoo is described by URIs,
the canonical zoo by a manifest, and the windows stream.

Train side (every draw is a function of the seed, the epoch and the rank)::

    data = prepare_data(cfg)
    train_sane(train_cfg, data.streams, ...)                # "train", "val" (and "test")
    # in the loop, per epoch:
    ds = streams["train"].dataset(seed, epoch, rank, world)
    for batch in ds.iter_torch_batches(batch_size=32, local_shuffle_buffer_size=..., local_shuffle_seed=...):
        batch["x_i"], batch["x_j"], batch["mask"], batch["pos"], batch["model_idx"]

Order and local shuffling: windows arrive in random order, and within a window task's
block (``models_per_block`` models) in rounds of one window per checkpoint with a model's
checkpoints spread apart (:mod:`sane_ray.data.windows`), so a batch of up to
``models_per_block`` consecutive windows holds distinct models. A local shuffle buffer
mixes windows across blocks but can put two windows of one model into a batch; keep it
small (a few batches) or leave it off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sane_ray import lease, storage
from sane_ray.data.canonical import Plan, build_canonical, cache_key, plan
from sane_ray.data.format import (CanonicalZoo, DataPreparationError, LayoutGroup, default_cache_uri, load_manifest,
                                  load_stats)
from sane_ray.data.config import DataConfig
from sane_ray.data.splits import SPLITS
from sane_ray.data.draw import StreamSpec, window_shares
from sane_ray.data.stream import WindowStream
from sane_ray.data.windows import check_window_size
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import TokenLayout
from sane_ray.zoo.reader import open_zoo
from sane_ray.zoo.spec import Skipped

log = logging.getLogger(__name__)

CACHE_POLL_S = 2.0  # how often a run waiting for another run's canonical zoo looks for it


@dataclass
class PreparedData:
    """Datasets and everything the model and downstream tasks need to know about them.

    ``stats`` is keyed by layout id (one per distinct architecture shape; most zoos have
    one): :meth:`group_of` and :meth:`stats_of` find a model's. ``streams`` draw each
    split's window datasets (:class:`~sane_ray.data.stream.WindowStream`). ``pad_position`` is the
    largest ``(n, l, k)`` any batch contains: position tables need one more row each.
    ``num_windows`` counts windows per pass, per split.
    """

    streams: dict[str, WindowStream]
    canonical: CanonicalZoo
    stats: dict[str, StandardizationStats]
    token_size: int
    window_size: int
    pad_position: tuple[int, int, int]
    sequence_lengths: dict[str, int]  # architecture name -> tokens per model
    num_windows: dict[str, int]
    cache_hit: bool

    @property
    def cache_uri(self) -> str:
        return self.canonical.uri

    @property
    def splits(self) -> dict[str, list[str]]:
        return self.canonical.splits

    @property
    def skipped(self) -> list[Skipped]:
        return self.canonical.skipped

    @property
    def layouts(self) -> dict[str, TokenLayout]:
        return self.canonical.layouts()

    def group_of(self, model_id: str) -> LayoutGroup:
        """The layout group (layout JSON, architecture, alignment reference) of one of the zoo's models."""
        try:
            return self.canonical.groups[self.canonical.layout_of[model_id]]
        except KeyError:
            raise KeyError(f"model {model_id!r} is not in the prepared data of {self.canonical.zoo_uri}") from None

    def stats_of(self, model_id: str) -> StandardizationStats:
        return self.stats[self.group_of(model_id).layout_id]

    def stats_for(self, architecture: str, arch_kwargs: dict | None = None) -> StandardizationStats:
        """Statistics for any model of an architecture present in the zoo (e.g. a sampled one)."""
        return self.stats[self.canonical.group_for(architecture, arch_kwargs).layout_id]


def _build_or_reuse(p: Plan, cfg: DataConfig, uri: str, key: str, s3: storage.S3Options,
                    node_types: bool) -> tuple[CanonicalZoo, bool]:
    """The canonical zoo at ``uri`` and whether it was reused; built under its own lease.

    The cache is shared by every run of the same zoo and settings: one builder holds its
    lease, and a second run waits for that one's manifest instead of writing the same
    shards beside it (a builder that died leaves a stale lease, which is taken over).
    """
    waiting = False
    while True:
        canonical = load_manifest(uri, s3)
        if canonical is not None:
            log.info("reusing the canonical tokenized zoo at %s", uri)
            return canonical, True
        try:
            held = lease.acquire(uri, "canonical zoo build", s3)
        except lease.LeaseHeldError as e:
            if not waiting:
                log.info("waiting for the canonical zoo another run is building: %s", e)
                waiting = True
            time.sleep(CACHE_POLL_S)
            continue
        with held:
            canonical = load_manifest(uri, s3)  # finished while this run waited for the lease
            if canonical is not None:
                return canonical, True
            log.info("building the canonical tokenized zoo of %s at %s", p.zoo.uri, uri)
            return build_canonical(p, cfg, uri, key, s3, node_types), False


def prepare_data(cfg: DataConfig, s3: storage.S3Options | None = None, node_types: bool = False) -> PreparedData:
    """Validate, build or reuse the canonical tokenized zoo, and return one window dataset per split.

    ``node_types``: preprocess and draw windows on CPU-type nodes (:mod:`sane_ray.cluster`)."""
    if not cfg.zoo_uri:
        raise DataPreparationError("DataConfig.zoo_uri is not set")
    s3 = (s3 or storage.S3Options()).resolved()
    zoo = open_zoo(cfg.zoo_uri, s3=s3)
    p = plan(zoo, cfg)
    check_window_size(cfg.window_size, {"/".join(g.architectures): g.sequence_length for g in p.groups.values()})

    key = cache_key(zoo, cfg)
    uri = storage.join(storage.parse_uri(cfg.cache_uri or default_cache_uri(zoo.uri), s3).uri, key)
    canonical, hit = _build_or_reuse(p, cfg, uri, key, s3, node_types)
    if canonical.skipped:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in canonical.skipped[:5])
        log.warning("left out %d checkpoint(s)/model(s) of %s, e.g. %s",
                    len(canonical.skipped), canonical.zoo_uri, reasons)

    spec = StreamSpec.build(canonical, cfg)
    if len(spec.layout_ids) > 1:
        log.info("windows per training pass by architecture: %s", ", ".join(
            f"{a} {share:.0%}" for a, share in window_shares(spec, canonical).items()))
    streams = {s: WindowStream.build(canonical, s, cfg, spec, s3, node_types) for s in SPLITS if canonical.files[s]}
    return PreparedData(
        streams=streams,
        canonical=canonical,
        stats=load_stats(uri, s3),
        token_size=cfg.token_size,
        window_size=cfg.window_size,
        pad_position=spec.pad_position,
        sequence_lengths={a: g.sequence_length for g in canonical.groups.values() for a in g.architectures},
        num_windows={s: stream.windows_per_pass for s, stream in streams.items()},
        cache_hit=hit,
    )
