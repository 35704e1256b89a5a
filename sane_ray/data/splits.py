"""Train/val/test splits by model (never by checkpoint), deterministic from sorted ids and a seed.

All checkpoints of a model stay in one split, so no split sees another's training
trajectory. The assignment depends only on the set of model ids, the fractions and the
seed: the ids are sorted, shuffled with ``numpy.random.default_rng(seed)`` and cut. A zoo
mixing architectures is split per architecture (stratified), each with the same
fractions and seed: every architecture has its share of validation and test models, and
the models of one architecture split exactly as a zoo of that architecture alone would, so
a run on the mixed zoo and a run on one architecture's models test on the same models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """A zoo has too few models for the requested splits (the message gives the counts)."""


def split_sizes(num_models: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Models per split: rounded fractions, at least one for every non-zero fraction, train gets the rest."""
    if len(fractions) != 3:
        raise ValueError(f"split fractions must be (train, val, test), got {tuple(fractions)}")
    needed = sum(1 for f in fractions if f > 0)
    if num_models < needed:
        pct = "/".join(f"{100 * f:g}" for f in fractions)
        raise SplitError(
            f"the zoo has {num_models} usable model(s), but splits {pct} need at least {needed} "
            "(one per non-empty split); add models or set split_fractions with fewer non-zero entries"
        )
    val, test = (max(1, round(f * num_models)) if f > 0 else 0 for f in fractions[1:])
    while num_models - val - test < 1:  # rounding up the small splits must leave one training model
        if val >= test and val > 1:
            val -= 1
        else:
            test -= 1
    return num_models - val - test, val, test


def split_models(model_ids: Iterable[str], fractions: Sequence[float], seed: int,
                 strata: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}``, each list sorted; with ``strata`` (model id ->
    architecture) naming more than one, split per stratum (module doc)."""
    ids = sorted(set(model_ids))
    groups = sorted({strata[i] for i in ids}) if strata else []
    if len(groups) > 1:
        out: dict[str, list[str]] = {name: [] for name in SPLITS}
        for g in groups:
            try:
                part = split_models([i for i in ids if strata[i] == g], fractions, seed)
            except SplitError as e:
                raise SplitError(f"architecture {g}: {e} (a zoo mixing architectures is split per architecture)") from None
            for name in SPLITS:
                out[name] += part[name]
        return {name: sorted(members) for name, members in out.items()}
    n_train, n_val, _ = split_sizes(len(ids), fractions)
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    cuts = (shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :])
    return {name: sorted(members) for name, members in zip(SPLITS, cuts)}
