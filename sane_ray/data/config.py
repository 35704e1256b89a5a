"""Settings of the data side: which checkpoints, how they are preprocessed, how windows are drawn.

Fields split in two kinds. *Preprocessing* fields (:data:`CANONICAL_FIELDS`) change the
canonical tokenized zoo and are part of its cache key; *stream* fields (window size,
supersampling, permutation augmentation, block sizes, actor pool) only change how
windows are drawn from it, so changing them reuses the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sane_ray.weights.tokenize import BnMode, bn_mode
from sane_ray.zoo.checks import DEFAULT_MAX_ABS

# Fields whose values change the canonical tokenized zoo (and thus its cache key).
CANONICAL_FIELDS = (
    "token_size", "include_bn", "epochs", "skip_epoch_zero", "align", "reference_model",
    "align_max_sweeps", "align_seed", "split_fractions", "split_seed", "max_abs_weight",
)


@dataclass
class DataConfig:
    """Where the zoo is, how it becomes tokens, and how training windows are drawn from them."""

    zoo_uri: str = ""
    """The zoo to train on (path or s3://); "": the built-in digits zoo, generated on first use."""
    cache_uri: str = ""
    """Where the canonical tokenized zoo is cached; "" puts it next to the zoo (<zoo_uri>.canonical),
    on the same storage, so every node of a cluster can read it."""

    # ---- preprocessing (part of the cache key)
    token_size: int = 289
    """Weights per token (d_t): every output row of a layer, with its bias, is cut into tokens this long."""
    include_bn: BnMode = False
    """BatchNorm tokenization (sane_ray.weights.tokenize.BN_MODES): false = kept aside (the paper),
    affine = BN weights tokenized and running statistics aside, true = everything tokenized."""
    epochs: list[int] | None = None
    """Checkpoints (epochs) of every model to use; null: every stored epoch."""
    skip_epoch_zero: bool = False
    """Leave out the initialization checkpoints."""
    align: bool = True
    """Weight-match every model to the reference (git re-basin), so equal functions look alike."""
    reference_model: str = ""
    """The model everyone is aligned to; "": the first model (sorted ids) of the training split."""
    align_max_sweeps: int = 100
    """Most coordinate-descent sweeps of one alignment (it stops earlier after a sweep that changes nothing)."""
    align_seed: int = 0
    """Order in which the alignment visits the permutation groups."""
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Train, val and test fractions, split by model (all of a model's checkpoints in one split)."""
    split_seed: int = 42
    """Which models land in which split."""
    max_abs_weight: float = DEFAULT_MAX_ABS
    """Checkpoints with a larger |weight| are skipped as diverged."""

    # ---- stream (free to change between runs)
    window_size: int = 32
    """Tokens per training window: the model's sequence length."""
    windows_per_model_epoch: int | None = None
    """Windows drawn per checkpoint per pass; null: max(1, round(sequence_length / window_size)),
    i.e. about one full coverage of every model per epoch (the paper's supersampling)."""
    architecture_weights: dict[str, float] | None = dataclasses.field(default_factory=dict)
    """Share of training windows per architecture in a zoo mixing architectures, relative (an architecture
    not named: 1); {}: every architecture equally often, whatever its size; null: no balancing, every
    checkpoint draws windows_per_model_epoch (its share then grows with its token count)."""
    permutation_augmentation: bool = True
    """View j of each window comes from a random function-preserving permutation of its model."""
    models_per_block: int = 64
    """Models (shard files, all their checkpoints) per window-drawing task. Windows are interleaved
    across them, so a batch of up to this many consecutive windows holds distinct models: keep it
    >= the per-worker batch size."""
    max_block_bytes: int = 512 * 1024**2
    """Caps models_per_block for large models: a block's tokens and the windows cut from them stay under this."""
    stream_cpus: float = 0.5
    """Logical CPUs per window-drawing task (they mostly read and copy)."""
    progress_bars: bool = False
    """Ray Data's per-operator progress bars on the console."""

    # ---- preprocessing compute
    num_actors: int = 2
    """Preprocessing parallelism: max actors (and concurrent statistics tasks)."""
    actor_cpus: float = 1.0
    """Logical CPUs per preprocessing actor."""

    def __post_init__(self) -> None:
        self.split_fractions = tuple(float(f) for f in self.split_fractions)  # type: ignore[assignment]
        if isinstance(self.token_size, bool) or not isinstance(self.token_size, int) or self.token_size < 1:
            raise ValueError(f"DataConfig.token_size must be an integer >= 1, got {self.token_size!r}")
        self.include_bn = bn_mode(self.include_bn)
        if self.window_size < 1:
            raise ValueError(f"DataConfig.window_size must be >= 1, got {self.window_size}")
        if self.windows_per_model_epoch is not None and self.windows_per_model_epoch < 1:
            raise ValueError(
                f"DataConfig.windows_per_model_epoch must be >= 1 or None, got {self.windows_per_model_epoch}"
            )
        fr = self.split_fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
            raise ValueError(
                "DataConfig.split_fractions must be three non-negative fractions (train, val, test) "
                f"summing to 1 with train > 0, got {fr}"
            )
        for name in ("models_per_block", "num_actors", "max_block_bytes", "align_max_sweeps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        bad = {k: v for k, v in (self.architecture_weights or {}).items() if not float(v) > 0}
        if bad:
            raise ValueError(f"DataConfig.architecture_weights must be > 0, got {bad}")
        for name in ("actor_cpus", "stream_cpus"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DataConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.epochs is not None and (not self.epochs or any(e < 0 for e in self.epochs)):
            raise ValueError(f"DataConfig.epochs must be None or a non-empty list of epochs >= 0, got {self.epochs}")

    def canonical_settings(self) -> dict[str, Any]:
        """The preprocessing settings, JSON-ready (for the cache key and the cache manifest)."""
        d = dataclasses.asdict(self)
        out = {k: d[k] for k in CANONICAL_FIELDS}
        out["split_fractions"] = list(self.split_fractions)
        out["epochs"] = sorted(set(self.epochs)) if self.epochs is not None else None
        return out

    def uses_epoch(self, epoch: int) -> bool:
        return epoch_filter({"epochs": self.epochs, "skip_epoch_zero": self.skip_epoch_zero})(epoch)


def epoch_filter(settings: Mapping[str, Any] | None) -> Callable[[int], bool]:
    """Which epochs a run trained on, from its canonical settings (:meth:`DataConfig.canonical_settings`,
    recorded in every run's export): the one rule every reader of a run's epochs applies.
    None or {} (no record): every epoch."""
    s = settings or {}
    wanted = None if s.get("epochs") is None else frozenset(int(e) for e in s["epochs"])
    skip_zero = bool(s.get("skip_epoch_zero"))
    return lambda epoch: not (skip_zero and epoch == 0) and (wanted is None or epoch in wanted)
