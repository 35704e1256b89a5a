"""Settings of the probe job (``sane-ray probe`` / ``jobs/probe.py``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ProbeConfig:
    """Which run embeds which zoo, where the results go, and how the probes are run."""

    run: str = ""
    """An exported pretraining run (its directory)."""
    zoo: str = ""
    """The zoo to embed and probe; "": the run's own zoo (recorded in its export)."""
    out: str = ""
    """Where the tables and figures go; "": <run>/probe."""
    epochs: list[int] | None = None
    """Checkpoints to probe; null: the epochs the run trained on (its data.epochs / skip_epoch_zero)."""
    max_flat_features: int = 20_000
    """W and SANE's full token sequence are probed only up to this many features per checkpoint."""
    folds: int = 5
    """Folds of a k-fold estimate grouped by model, beside the run's own split (0: skip)."""
    seed: int = 0
    """Fold assignment of the grouped k-fold estimate (splits come from the run)."""
    control: bool = True
    """Also probe an untrained SANE of the run's config (seeded as the run was)."""
    window_size: int = 0
    """Embedding pass length; 0: the run's training window."""
    halo: int | None = None
    """Halo tokens on each side of a pass; null: a quarter window, 0: plain windows."""
    device: str = ""
    """Torch device of the embedding passes; "": the GPU when there is one."""

    def __post_init__(self) -> None:
        if self.max_flat_features < 0:
            raise ValueError(f"ProbeConfig.max_flat_features must be >= 0, got {self.max_flat_features}")
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"ProbeConfig.folds must be 0 (off) or >= 2, got {self.folds}")
        if self.window_size < 0 or (self.halo is not None and self.halo < 0):
            raise ValueError("ProbeConfig.window_size and halo must be >= 0 (halo None: a quarter window)")
        if self.epochs is not None and (not self.epochs or any(e < 0 for e in self.epochs)):
            raise ValueError(f"ProbeConfig.epochs must be None or a non-empty list of epochs >= 0, got {self.epochs}")
