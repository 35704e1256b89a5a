"""The canonical zoo's format, for everyone who reads it: ``canonical.json`` (:class:`CanonicalZoo`),
``stats.json``, the shard schema, layout groups and the model records passed to workers.

:mod:`sane_ray.data.canonical` builds a canonical zoo; the stream, the shards reader, the
embedding path and the probe signal only read one, through this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from sane_ray import storage
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import BnMode, TokenLayout, layout_from_state_dict
from sane_ray.zoo.checks import reference_layout
from sane_ray.zoo.spec import METRICS, CheckpointRecord, ModelRecord, Skipped

log = logging.getLogger(__name__)


# Bump when the shard contents change for the same settings: old caches are then ignored.
CANONICAL_VERSION = 2  # 2: zoos mixing architectures split per architecture


CANONICAL_MANIFEST = "canonical.json"


STATS = "stats.json"


SHARD_SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("model_idx", pa.int64()),  # index of the model in the zoo's sorted model ids
        ("epoch", pa.int64()),
        ("layout_id", pa.string()),
        ("tokens", pa.large_binary()),  # float32 (num_tokens, token_size), C order
        *[(m, pa.float64()) for m in METRICS],
    ]
)


class DataPreparationError(ValueError):
    """The zoo cannot be turned into training data with these settings (the message says why)."""


@dataclass(frozen=True)
class LayoutGroup:
    """Models sharing one token layout: one set of statistics and one alignment reference."""

    layout_id: str
    layout_json: str
    architecture: str  # the first model's architecture and arguments (for the permutation spec)
    arch_kwargs_json: str
    architectures: tuple[str, ...]
    reference: tuple[str, int] | None = None  # (model_id, epoch), chosen from the training split

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_json(self.layout_json)

    @property
    def sequence_length(self) -> int:
        return self.layout.num_tokens


def architecture_layout(
    architecture: str, arch_kwargs: dict[str, Any], token_size: int, include_bn: BnMode
) -> tuple[str, str]:
    """(layout id, layout JSON) of an architecture, from shapes alone."""
    shapes = {k: shape for k, (shape, _) in reference_layout(architecture, arch_kwargs).items()}
    text = layout_from_state_dict(shapes, token_size, include_bn).to_json()
    return hashlib.sha256(text.encode()).hexdigest()[:12], text


def arch_kwargs_json(model: ModelRecord) -> str:
    return json.dumps(model.arch_kwargs, sort_keys=True)


@dataclass
class CanonicalZoo:
    """What ``canonical.json`` records: where the shards are and what they hold."""

    uri: str
    key: str
    zoo_uri: str
    settings: dict[str, Any]
    splits: dict[str, list[str]]  # model ids per split (models without usable checkpoints left out)
    files: dict[str, list[str]]  # shard paths per split, relative to ``uri``
    checkpoints: dict[str, dict[str, int]]  # split -> layout id -> rows
    groups: dict[str, LayoutGroup]
    model_index: dict[str, int] = field(default_factory=dict)  # model id -> model_idx
    layout_of: dict[str, str] = field(default_factory=dict)  # model id -> layout id
    skipped: list[Skipped] = field(default_factory=list)
    # Model id -> its checkpoints' SHA-256 as the zoo lists them (ModelRecord.digests; empty where the
    # zoo records none): the probe's test that a model of another zoo is the one this split holds.
    digests: dict[str, list[str]] = field(default_factory=dict)

    def layouts(self) -> dict[str, TokenLayout]:
        return {lid: g.layout for lid, g in self.groups.items()}

    def group_for(self, architecture: str, arch_kwargs: dict[str, Any] | None = None) -> LayoutGroup:
        """The group whose layout (and statistics) an architecture shares, e.g. to sample new models of it."""
        lid, _ = architecture_layout(
            architecture, arch_kwargs or {}, self.settings["token_size"], self.settings["include_bn"]
        )
        if lid not in self.groups:
            known = ", ".join("/".join(g.architectures) for g in self.groups.values())
            raise KeyError(f"architecture {architecture} {arch_kwargs or {}} has no layout in this zoo (it has: {known})")
        return self.groups[lid]

    def largest_position(self) -> tuple[int, int, int]:
        """Largest real (n, l, k) over all layouts (position *tables* are ``SaneConfig.max_positions``)."""
        n = max(g.layout.num_tokens for g in self.groups.values()) - 1
        lay = max(len(g.layout.layers) for g in self.groups.values()) - 1
        k = max(s.rows for g in self.groups.values() for s in g.layout.layers) - 1
        return n, lay, k

    def pad_position(self) -> tuple[int, int, int]:
        """The ``(n, l, k)`` of padded window slots: one past the largest real position, so position
        tables hold one padding row and alias no real position (training, embedding and probing all use it)."""
        n, lay, k = self.largest_position()
        return n + 1, lay + 1, k + 1

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["groups"] = {lid: dataclasses.asdict(g) for lid, g in self.groups.items()}
        d["skipped"] = [dataclasses.asdict(s) for s in self.skipped]
        d["version"] = CANONICAL_VERSION
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> CanonicalZoo:
        d = json.loads(text)
        if d.pop("version", None) != CANONICAL_VERSION:
            raise ValueError("canonical zoo manifest of another version")
        groups = {}
        for lid, g in d.pop("groups").items():
            g["architectures"] = tuple(g["architectures"])
            g["reference"] = tuple(g["reference"]) if g["reference"] else None
            groups[lid] = LayoutGroup(**g)
        skipped = [Skipped(**s) for s in d.pop("skipped")]
        return cls(groups=groups, skipped=skipped, **d)


def default_cache_uri(zoo_uri: str) -> str:
    """``<zoo_uri>.canonical``: beside the zoo, on the same storage (shared by every node)."""
    loc = storage.parse_uri(zoo_uri)
    if loc.scheme == "s3" and "/" not in loc.path:
        raise DataPreparationError(f"zoo {zoo_uri} is a bucket root: set cache_uri for the canonical zoo")
    return loc.uri.rstrip("/") + ".canonical"


def load_manifest(uri: str, s3: storage.S3Options | None = None) -> CanonicalZoo | None:
    """The finished canonical zoo at ``uri``, or None if there is none (or an unfinished one)."""
    if not storage.exists(storage.join(uri, CANONICAL_MANIFEST), s3):
        return None
    try:
        return CanonicalZoo.from_json(storage.read_bytes(storage.join(uri, CANONICAL_MANIFEST), s3).decode())
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable canonical manifest at %s: %s", uri, e)
        return None


def load_stats(uri: str, s3: storage.S3Options | None = None) -> dict[str, StandardizationStats]:
    """Standardization statistics per layout id, as persisted next to the shards."""
    data = json.loads(storage.read_bytes(storage.join(uri, STATS), s3))
    return {lid: StandardizationStats.from_dict(d) for lid, d in data.items()}


def model_to_json(model: ModelRecord, **extra: Any) -> str:
    return json.dumps({"model": dataclasses.asdict(model), **extra})


def model_from_json(text: str) -> tuple[ModelRecord, dict[str, Any]]:
    d = json.loads(text)
    m = d.pop("model")
    m["checkpoints"] = [CheckpointRecord(**c) for c in m["checkpoints"]]
    return ModelRecord(**m), d
