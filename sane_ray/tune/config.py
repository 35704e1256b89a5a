"""A sweep's settings: the base pretraining run, the search space, and how trials are chosen and stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sane_ray.pretrain_config import PretrainConfig

# objective name -> (the metric the train loop reports, Tune's mode)
OBJECTIVES: dict[str, tuple[str, str]] = {"val_loss": ("val_loss", "min"), "probe_r2": ("val_probe_r2", "max")}


@dataclass
class SweepConfig:
    """A hyperparameter sweep over pretraining runs (``sane-ray tune``, docs/tune.md)."""

    # The base configuration (the keys of `jobs/pretrain.py --config`); each trial changes the space's keys.
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted pretraining key -> {choice|uniform|loguniform|randint: [...]} (docs/tune.md)."""
    name: str = "sane-sweep"
    """The sweep's directory under out; rerunning with the same name resumes it."""
    out: str = ""
    """The sweep directory's parent; "": ~/.cache/sane-ray/sweeps."""
    samples: int = 8
    """Trials to run."""
    max_concurrent: int = 0
    """Trials at once; 0: as many as the cluster holds."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha stops weak trials early at rungs of epochs; fifo runs every trial to the end."""
    search: Literal["random", "optuna"] = "random"
    """How trials' values are drawn from the space: random, or optuna's TPE (pip install 'sane-ray[optuna]')."""
    objective: Literal["val_loss", "probe_r2"] = "val_loss"
    """val_loss (minimized) or probe_r2 (maximized; needs pretrain.train.probe_every), at a trial's last epoch."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it may be stopped."""
    reduction_factor: int = 2
    """ASHA: about 1/reduction_factor of the trials go on at each rung."""
    trial_cpus: float = 0.25
    """Logical CPUs of each Tune trial process (it only waits; its Train workers ask for their own)."""
    seed: int = 0
    """Seeds the searcher's draws."""
    include_base: bool = True
    """The first trial runs the base configuration (when it lies inside the space)."""

    def __post_init__(self) -> None:
        for name in ("samples", "grace_period"):
            if getattr(self, name) < 1:
                raise ValueError(f"SweepConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrent < 0:
            raise ValueError(f"SweepConfig.max_concurrent must be >= 0, got {self.max_concurrent}")
        if self.reduction_factor < 2:
            raise ValueError(f"SweepConfig.reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.trial_cpus <= 0:
            raise ValueError(f"SweepConfig.trial_cpus must be > 0, got {self.trial_cpus}")
        if not self.name or "/" in self.name:
            raise ValueError(f"SweepConfig.name must be a non-empty name without '/', got {self.name!r}")


# Short flags beside the top-level keys' own (--name, --out, --samples, --scheduler, --search, --objective).
SWEEP_ALIASES = {
    "zoo": "pretrain.data.zoo_uri",
    "max-concurrent": "max_concurrent",
    "tracking": "pretrain.tracking.backend",
}
