"""Linear probes (scikit-learn): ridge regression for model properties, ridge classification for categories.

The protocol follows the paper's: features are standardized with training-split
statistics, ridge regression (with intercept) is fitted on the training split for every
alpha of a log grid (1e3 ... 1e-5), the alpha with the best validation score is kept,
and the test score of that fit is reported. Rows are checkpoints; splits are by model
(all checkpoints of a model share a split). A grouped k-fold estimate rotates the same
protocol over folds of models, for small zoos where one test split is noisy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import accuracy_score, r2_score
from sklearn.preprocessing import StandardScaler

ALPHAS: tuple[float, ...] = tuple(10.0**e for e in range(3, -6, -1))  # 1e3 ... 1e-5


@dataclass
class ProbeScore:
    """One probe on one target: the test score (R^2, or accuracy for a category) and how it was reached."""

    score: float
    alpha: float
    val_score: float
    test_pred: np.ndarray
    test_true: np.ndarray
    # Classification only (NaN for a regression): ``chance`` is the test accuracy of always answering the
    # training split's majority class (0 when that class has no test rows); ``test_majority`` is the
    # test split's own majority share, the best any constant answer can score there.
    chance: float = float("nan")
    test_majority: float = float("nan")


def _masks(split: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ok = np.isfinite(y)  # rows without a value are left out
    return tuple(ok & (split == s) for s in ("train", "val", "test"))  # type: ignore[return-value]


def _check(name: str, masks: tuple[np.ndarray, ...]) -> None:
    for s, m in zip(("train", "val", "test"), masks):
        if not m.any():
            raise ValueError(f"probe for {name}: no {s} rows with a value (splits need models with this property)")


def _scaled(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    return StandardScaler().fit(x[train]).transform(x)


def _fit_all_alphas(x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...]) -> Ridge:
    """One ridge fit per alpha in a single call: ``y`` (n, T) is repeated once per alpha and each copy
    gets its own alpha, so scikit-learn forms X^T X once and solves for every alpha (a 9x saving)."""
    tiled = np.tile(y, (1, len(alphas)))
    return Ridge(alpha=np.repeat(np.asarray(alphas, dtype=np.float64), y.shape[1])).fit(x, tiled)


def ridge_probe(x: np.ndarray, y: np.ndarray, split: np.ndarray, alphas: tuple[float, ...] = ALPHAS,
                name: str = "target") -> ProbeScore:
    """Test R^2 of a ridge regression of ``y`` on ``x``, alpha chosen by validation R^2.

    ``split`` holds ``"train"``, ``"val"`` or ``"test"`` per row; rows whose ``y`` is NaN
    are left out.
    """
    y = np.asarray(y, dtype=np.float64)
    tr, va, te = _masks(np.asarray(split), y)
    _check(name, (tr, va, te))
    xs = _scaled(np.asarray(x, dtype=np.float64), tr)
    fit = _fit_all_alphas(xs[tr], y[tr, None], alphas)
    val = [r2_score(y[va], p) if va.sum() > 1 else -np.inf for p in fit.predict(xs[va]).T]
    best = int(np.argmax(val))  # the first (largest) alpha among ties
    pred = fit.predict(xs[te])[:, best]
    score = float(r2_score(y[te], pred)) if te.sum() > 1 else float("nan")
    return ProbeScore(score, alphas[best], float(val[best]), pred, y[te])


def classifier_probe(x: np.ndarray, labels: np.ndarray, split: np.ndarray, alphas: tuple[float, ...] = ALPHAS,
                     name: str = "target") -> ProbeScore:
    """Test accuracy of a ridge classifier of ``labels`` on ``x``, alpha chosen by validation accuracy.

    Like scikit-learn's ``RidgeClassifier``: ridge regression on +-1 class indicators,
    the class with the largest output wins. Labels are compared as strings; rows
    labelled None are left out. ``chance`` is the accuracy on the test rows of always answering
    the training split's most frequent class (what a probe that learned nothing but the class
    frequencies scores); ``test_majority`` is the share of the test split's most frequent class.
    """
    known = np.array([v is not None for v in labels])
    labels = np.array([str(v) for v in labels], dtype=object)
    split = np.asarray(split)
    tr, va, te = (known & (split == s) for s in ("train", "val", "test"))
    _check(name, (tr, va, te))
    classes, counts = np.unique(labels[tr].astype(str), return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"probe for {name}: the training split holds a single class ({classes[0]!r})")
    indicators = np.where(labels[tr, None] == classes[None, :], 1.0, -1.0)
    xs = _scaled(np.asarray(x, dtype=np.float64), tr)
    fit = _fit_all_alphas(xs[tr], indicators, alphas)

    def predict(rows: np.ndarray) -> np.ndarray:  # (alphas, rows) class names
        out = fit.predict(xs[rows]).reshape(int(rows.sum()), len(alphas), len(classes))
        return classes[out.argmax(axis=2)].T

    val = [accuracy_score(labels[va], p) for p in predict(va)]
    best = int(np.argmax(val))
    pred = predict(te)[best]
    chance = float(np.mean(labels[te] == classes[np.argmax(counts)]))
    test_majority = float(np.unique(labels[te].astype(str), return_counts=True)[1].max() / te.sum())
    return ProbeScore(float(accuracy_score(labels[te], pred)), alphas[best], float(val[best]), pred, labels[te],
                      chance, test_majority)


def fold_of_groups(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold index per row: the sorted distinct groups are shuffled with ``seed`` and dealt to ``k`` folds."""
    names = np.unique(groups)
    if len(names) < k:
        raise ValueError(f"grouped {k}-fold needs at least {k} models, got {len(names)}")
    fold_of = dict(zip(names[np.random.default_rng(seed).permutation(len(names))], np.arange(len(names)) % k))
    return np.array([fold_of[g] for g in groups])


@dataclass
class FoldScores:
    """A test score per fold, its mean and standard deviation over folds, and each fold's validation score
    (the score of the alpha chosen on that fold's validation models: what a nested choice between
    feature sets compares)."""

    scores: list[float]
    val_scores: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        return float(np.std(self.scores))


def grouped_kfold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int = 5, seed: int = 0,
                  categorical: bool = False, alphas: tuple[float, ...] = ALPHAS, name: str = "target") -> FoldScores:
    """The probe protocol over ``k`` folds of models: fold f is the test set, fold f+1 picks alpha, the rest trains."""
    fold = fold_of_groups(np.asarray(groups), k, seed)
    probe = classifier_probe if categorical else ridge_probe
    scores, val_scores = [], []
    for f in range(k):
        split = np.where(fold == f, "test", np.where(fold == (f + 1) % k, "val", "train"))
        res = probe(x, y, split, alphas, name)
        scores.append(res.score)
        val_scores.append(res.val_score)
    return FoldScores(scores, val_scores)


def select_on_validation(val_scores: dict[str, float]) -> str:
    """The candidate with the best validation score (NaN counts as worst; the first listed wins ties)."""
    if not val_scores:
        raise ValueError("select_on_validation: no candidates")
    return max(val_scores, key=lambda m: -np.inf if np.isnan(val_scores[m]) else val_scores[m])


def nested_kfold_selection(folds: dict[str, FoldScores]) -> tuple[FoldScores, list[str]]:
    """Per fold, the test score of the candidate whose validation score on that fold is best: a choice
    between feature sets made without the fold's test models. Returns the scores and each fold's choice."""
    k = {len(f.scores) for f in folds.values()}
    if len(k) != 1 or any(len(f.val_scores) != len(f.scores) for f in folds.values()):
        raise ValueError("nested_kfold_selection: every candidate needs a test and a validation score per fold")
    chosen = [select_on_validation({m: f.val_scores[i] for m, f in folds.items()}) for i in range(k.pop())]
    return FoldScores([folds[m].scores[i] for i, m in enumerate(chosen)],
                      [folds[m].val_scores[i] for i, m in enumerate(chosen)]), chosen
