"""A pretrained run, loaded once: the SANE model plus how the run preprocessed its data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sane_ray.data.canonical import MANIFEST as CANONICAL_MANIFEST
from sane_ray.data.canonical import CanonicalZoo
from sane_ray.embed.preprocess import Preprocessing
from sane_ray.model.export import ExportError, read_export, sane_from_files
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
        if self.canonical is None:
            return {}
        return {mid: split for split, ids in self.canonical.splits.items() for mid in ids}


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
        try:
            canonical = CanonicalZoo.from_json(files[CANONICAL_MANIFEST].decode())
        except (ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{run_uri}/{CANONICAL_MANIFEST}: unreadable canonical manifest ({e})") from e
    return Run(run_uri, model, prep, canonical)
