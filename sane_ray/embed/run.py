"""A pretrained run, loaded once: the SANE model plus how the run preprocessed its data."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from sane_ray import storage
from sane_ray.data.format import CANONICAL_MANIFEST, CanonicalZoo
from sane_ray.embed.preprocess import PREPROCESSING_FILE, Preprocessing, reference_file
from sane_ray.model.export import CONFIG_FILE, ExportError, read_export, sane_from_files
from sane_ray.model.sane import SaneModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Run:
    """What embedding needs from a run directory (see :func:`load_run`).

    ``canonical`` is the run's canonical-zoo manifest (its zoo URI and the run's split of
    model ids), None if the export has none.
    """

    uri: str
    model: SaneModel
    preprocessing: Preprocessing
    canonical: CanonicalZoo | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def splits(self) -> dict[str, str]:
        """Model id -> split ("train"/"val"/"test") of the run's own zoo (empty without a manifest)."""
        return splits_of(self.canonical)


def untrained_control(run: Run, seed: int) -> Run:
    """The same run with a freshly initialized SANE of its config (seeded): the control that shows
    what pretraining adds over random features of the same preprocessing and architecture."""
    devices = run.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SaneModel(run.model.cfg)
    return dataclasses.replace(run, model=model.to(devices).eval())


def splits_of(canonical: CanonicalZoo | None) -> dict[str, str]:
    """Model id -> split of a canonical manifest (empty for None)."""
    if canonical is None:
        return {}
    return {mid: split for split, ids in canonical.splits.items() for mid in ids}


def _canonical(data: bytes, where: str) -> CanonicalZoo:
    try:
        return CanonicalZoo.from_json(data.decode())
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{where}: unreadable canonical manifest ({e})") from e


def run_canonical(run_uri: str, s3: storage.S3Options | None = None) -> CanonicalZoo | None:
    """Just the run's canonical manifest (its zoo URI and split), without loading the model."""
    where = storage.join(run_uri, CANONICAL_MANIFEST)
    return _canonical(storage.read_bytes(where, s3), where) if storage.exists(where, s3) else None


def load_preprocessing(run_uri: str, s3: storage.S3Options | None = None) -> Preprocessing:
    """Just the run's preprocessing (settings, statistics, reference weights), without the model:
    for a driver that plans work its actors do with :func:`load_run` (which verifies every file)."""
    doc = storage.read_bytes(storage.join(run_uri, PREPROCESSING_FILE), s3)
    lids = json.loads(doc)["layouts"]
    files = {PREPROCESSING_FILE: doc, CONFIG_FILE: storage.read_bytes(storage.join(run_uri, CONFIG_FILE), s3)}
    files.update({reference_file(lid): storage.read_bytes(storage.join(run_uri, reference_file(lid)), s3) for lid in lids})
    return Preprocessing.from_files(files, run_uri)


def load_run(run_uri: str, device: str | torch.device | None = None) -> Run:
    """Read and verify a run's export (one pass over its files) into a :class:`Run` on ``device``
    (default: the GPU when there is one)."""
    files = read_export(run_uri)
    model = sane_from_files(files, run_uri, device or default_device())
    try:
        prep = Preprocessing.from_files(files, run_uri)
    except ValueError as e:
        raise ExportError(str(e)) from e
    canonical = None
    if CANONICAL_MANIFEST in files:
        canonical = _canonical(files[CANONICAL_MANIFEST], storage.join(run_uri, CANONICAL_MANIFEST))
    return Run(run_uri, model, prep, canonical)
