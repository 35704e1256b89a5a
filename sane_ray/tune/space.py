"""Search spaces: dotted pretraining keys mapped to distributions, as written in a sweep's config file.

```yaml
space:
  train.optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
  train.model.temperature: {uniform: [0.05, 0.5]}
  data.window_size: {choice: [8, 16, 32]}
  train.model.n_layers: {randint: [1, 4]}      # 1, 2 or 3 (upper bound excluded)
```

A key is any leaf of :class:`~sane_ray.pretrain_config.PretrainConfig` except those that say
where a run lives or what it runs on (:data:`NOT_TUNABLE`). Keys that change the
canonical zoo (``data.token_size``, ``data.align``, ...) must be a ``choice``: each
distinct preprocessing setting is built once, before any trial starts.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from typing import Any

from sane_ray.config import ConfigError, leaf_keys
from sane_ray.data.config import CANONICAL_FIELDS

KINDS = ("choice", "uniform", "loguniform", "randint")
# Where a run lives, what it runs on, or what the job fills in: not hyperparameters.
NOT_TUNABLE = ("data.zoo_uri", "data.cache_uri", "data.progress_bars", "data.stream_cpus", "data.num_actors",
               "data.actor_cpus", "train.model.d_t", "train.model.window_size",
               "train.steps_per_epoch", "train.max_failures", "train.checkpoints_to_keep")
NOT_TUNABLE_SECTIONS = ("run.", "tracking.")
PREPROCESSING = tuple(f"data.{f}" for f in CANONICAL_FIELDS)


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter: ``kind`` over ``values`` (choice: the options; ranges: low, high)."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def corners(self) -> list[Any]:
        """The values that bound the dimension: every option, or both ends of a range."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        lo, hi = self.values
        return lo <= value < hi if self.kind == "randint" else lo <= value <= hi


def tunable_keys(config_cls: type) -> list[str]:
    """Every dotted key of the pretraining config a sweep may vary."""
    return [k for k in leaf_keys(config_cls)
            if k not in NOT_TUNABLE and not k.startswith(NOT_TUNABLE_SECTIONS)]


def parse_space(space: Any, config_cls: type) -> list[Dimension]:
    """The dimensions of a ``space`` mapping; every mistake is a one-line :class:`ConfigError`."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("the search space is empty: give at least one hyperparameter under 'space:' "
                          "(e.g. train.optim.lr: {loguniform: [1.0e-4, 3.0e-3]})")
    valid = tunable_keys(config_cls)
    dims = []
    for key, spec in space.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown hyperparameter {key!r} in the search space{hint}; valid names: {', '.join(valid)}")
        dims.append(_dimension(key, spec))
    return dims


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"search space entry {key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where} must be one of {{{': ..., '.join(KINDS)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {values!r}")
    if kind == "choice":
        if any(isinstance(v, dict) for v in values):
            raise ConfigError(f"{where}: choice options must be values or lists, got {values!r}")
        return Dimension(key, kind, tuple(tuple(v) if isinstance(v, list) else v for v in values))
    if key in PREPROCESSING:
        raise ConfigError(f"{where}: {key} changes the preprocessing, so it must be a choice "
                          "(each distinct setting is built once before the trials)")
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{where}: {kind} takes [low, high] numbers, got {values!r}")
    lo, hi = values
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {values!r}")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}: randint takes [low, high) integers, got {values!r}")
    return Dimension(key, kind, (lo, hi))


def preprocessing_settings(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Every distinct combination of the preprocessing keys' options (``[{}]`` if none is searched)."""
    pre = [d for d in dims if d.key in PREPROCESSING]
    return [dict(zip((d.key for d in pre), combo)) for combo in itertools.product(*(d.values for d in pre))]
