"""Pretraining settings: a typed config tree with defaults (loads from YAML/TOML).

The model section is a :class:`~sane_ray.model.SaneConfig`; its defaults are the
``reference`` preset. ``batch_size`` is per worker: with N workers the contrastive loss
sees N * batch_size windows (negatives are gathered across workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sane_ray.model.config import SaneConfig


@dataclass
class OptimConfig:
    """AdamW with a per-step OneCycle schedule (peak ``lr``) and gradient clipping."""

    lr: float = 1e-4
    """Peak learning rate of the OneCycle schedule."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices and embedding tables only (not norms or biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (beta1, beta2); with cycle_momentum the schedule sets beta1."""
    pct_start: float = 0.3
    """Fraction of the steps spent warming up to lr."""
    div_factor: float = 25.0
    """The schedule starts at lr / div_factor."""
    final_div_factor: float = 1e4
    """The schedule anneals (cosine) to lr / (div_factor * final_div_factor)."""
    cycle_momentum: bool = True
    """Cycle beta1 inversely to the learning rate, between 0.85 and 0.95 (torch's OneCycleLR)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if self.lr <= 0:
            raise ValueError(f"OptimConfig.lr must be positive, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"OptimConfig.betas must be two numbers, got {self.betas}")
        if not 0.0 < self.pct_start < 1.0:
            raise ValueError(f"OptimConfig.pct_start must be in (0, 1), got {self.pct_start}")
        if self.grad_clip < 0:
            raise ValueError(f"OptimConfig.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass
class TrainConfig:
    """One pretraining run: model, optimizer, epochs, batching, checkpoints."""

    model: SaneConfig = field(default_factory=SaneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 50
    """Training epochs (passes over the train split's windows)."""
    batch_size: int = 32
    """Windows per worker and step."""
    local_shuffle_buffer_size: int = 0
    """Rows buffered for shuffling per worker; 0 disables."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch; null: derived from the train dataset's row count."""
    checkpoint_every: int = 1
    """Epochs between checkpoints (the last epoch always checkpoints)."""
    checkpoints_to_keep: int = 2
    """Newest checkpoints kept on storage; older ones are pruned."""
    max_failures: int = 3
    """Worker-group restarts from the last checkpoint (tests that inject faults set 0)."""
    seed: int = 0
    """Initial weights; with the epoch and rank, also every shuffle, noise and dropout draw."""
    num_threads: int = 0
    """torch intra-op threads per worker; 0: the run's plan (sane_ray.cluster.plan_run: the worker's
    CPU share rounded up), or torch's default where no plan sizes the run."""
    mixed_precision: bool = True
    """bf16 compute, fp32 reduction: CUDA, and CPUs with native bf16."""
    probe_every: int = 0
    """Every N epochs (and at the last) report val_probe_r2, the validation R^2 of a test-accuracy
    probe on the current embeddings (the pretraining job installs sane_ray.probe.signal); 0 disables it."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every", "checkpoints_to_keep"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("local_shuffle_buffer_size", "max_failures", "num_threads", "probe_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ValueError(f"TrainConfig.steps_per_epoch must be positive, got {self.steps_per_epoch}")
