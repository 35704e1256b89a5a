"""Probe building blocks: the baselines W and s(W), per-layer SANE summaries, ridge and classification probes,
grouped folds, choices made on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sane_ray.probe.features import PERCENTILES, STAT_NAMES, flat_weights, layer_moments, weight_statistics
from sane_ray.probe.linear import (classifier_probe, fold_of_groups, grouped_kfold, nested_kfold_selection, ridge_probe,
                                   select_on_validation)
from sane_ray.probe.report import table_csv, table_markdown
from sane_ray.weights.tokenize import tokenize_stack
from sane_ray.zoo.architectures import build_model


def _model_split(n_models: int, per_model: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row -> model id, and row -> split, by model (60/20/20)."""
    groups = np.repeat(np.arange(n_models), per_model)
    order = np.random.default_rng(seed).permutation(n_models)
    split_of = np.empty(n_models, dtype=object)
    split_of[order[: int(0.6 * n_models)]] = "train"
    split_of[order[int(0.6 * n_models): int(0.8 * n_models)]] = "val"
    split_of[order[int(0.8 * n_models):]] = "test"
    return groups, split_of[groups].astype(str)


def test_ridge_probe_recovers_a_known_linear_relation():
    rng = np.random.default_rng(0)
    groups, split = _model_split(60, 5)
    x = rng.normal(size=(len(groups), 8)) * rng.uniform(0.1, 10, size=8)  # unequal feature scales
    w = rng.normal(size=8)
    y = x @ w + 3.0 + 0.01 * rng.normal(size=len(groups))
    res = ridge_probe(x, y, split)
    assert res.score > 0.999
    np.testing.assert_allclose(res.test_pred, y[split == "test"], atol=0.1)
    assert res.alpha <= 1.0  # almost noise-free: little regularization wins on validation
    # The same features against an unrelated target explain nothing on held-out models.
    assert ridge_probe(x, rng.normal(size=len(groups)), split).score < 0.1


def test_ridge_probe_skips_rows_without_a_value_and_names_empty_splits():
    rng = np.random.default_rng(1)
    groups, split = _model_split(30, 2)
    x = rng.normal(size=(len(groups), 3))
    y = x[:, 0].copy()
    y[::7] = np.nan
    assert ridge_probe(x, y, split).score > 0.99
    with pytest.raises(ValueError, match="no val rows"):
        ridge_probe(x, y, np.where(split == "val", "train", split), name="test_acc")


def test_classifier_probe_separable_categories_and_chance():
    rng = np.random.default_rng(2)
    groups, split = _model_split(60, 3)
    labels = np.array(["relu", "tanh", "gelu"])[groups % 3]
    x = rng.normal(size=(len(groups), 4)) + 5.0 * np.eye(3, 4)[groups % 3]
    res = classifier_probe(x, labels, split)
    assert res.score == 1.0
    assert 0.0 < res.chance < 0.7
    noise = classifier_probe(rng.normal(size=(len(groups), 4)), labels, split)
    assert noise.score < 0.7


def test_classifier_chance_is_the_training_majority_scored_on_test_rows():
    groups, split = _model_split(20, 2)
    labels = np.where(split == "train", "relu", "tanh")  # the training majority never occurs in the test rows
    labels[np.flatnonzero(split == "train")[:4]] = "tanh"  # two classes to train on
    res = classifier_probe(np.random.default_rng(3).normal(size=(len(groups), 2)), labels, split)
    assert res.chance == 0.0  # "relu" on every test row
    assert res.test_majority == 1.0  # the table's other column says a constant could score 1.0 there


def test_select_on_validation_and_nested_folds_never_read_test_scores():
    assert select_on_validation({"a": 0.2, "b": float("nan"), "c": 0.5, "d": 0.5}) == "c"
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(25), 4)
    signal = rng.normal(size=(len(groups), 3))
    y = signal @ [1.0, 0.5, -1.0] + 0.1 * rng.normal(size=len(groups))
    folds = {"noise": grouped_kfold(rng.normal(size=(len(groups), 3)), y, groups, 5),
             "signal": grouped_kfold(signal, y, groups, 5)}
    nested, chosen = nested_kfold_selection(folds)
    assert chosen == ["signal"] * 5 and nested.scores == folds["signal"].scores
    # A candidate that is best on test in a fold but worse on validation there is not picked.
    trap = grouped_kfold(signal, y, groups, 5)
    trap.scores, trap.val_scores = [2.0] * 5, [v - 1 for v in folds["signal"].val_scores]
    assert nested_kfold_selection({**folds, "trap": trap})[1] == ["signal"] * 5


def test_layer_moments_keep_what_the_mean_over_all_tokens_mixes():
    layer = torch.tensor([0, 0, 1, 1, 1])
    z = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    z[1] = z[0, [2, 3, 4, 0, 1]]  # model 1: the same token latents, moved between the two layers
    mean = layer_moments(z, layer)
    np.testing.assert_allclose(mean[0], [*z[0, :2].mean(0), *z[0, 2:].mean(0)])
    assert z[0].mean(0).tolist() == z[1].mean(0).tolist() and not np.allclose(mean[0], mean[1])
    both = layer_moments(z, layer, with_std=True)
    assert both.shape == (2, 8)
    np.testing.assert_allclose(both[0], [*z[0, :2].mean(0), *z[0, :2].std(0, correction=0),
                                         *z[0, 2:].mean(0), *z[0, 2:].std(0, correction=0)])
    with pytest.raises(ValueError, match="does not match"):
        layer_moments(z, layer[:4])


def test_grouped_folds_keep_each_model_in_one_fold():
    groups = np.repeat(np.array([f"m{i}" for i in range(23)]), 4)
    fold = fold_of_groups(groups, 5, seed=3)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(fold, fold_of_groups(groups, 5, seed=3))  # seeded
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(groups), 3))
    scores = grouped_kfold(x, x @ [1.0, -2.0, 0.5], groups, k=5)
    assert len(scores.scores) == 5 and scores.mean > 0.99 and scores.std < 0.01
    with pytest.raises(ValueError, match="at least 30 models"):
        fold_of_groups(groups, 30, seed=0)


def test_weight_statistics_ignore_padding_and_match_the_state_dict():
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append({k: v.detach().clone() for k, v in build_model("cnn_digits").state_dict().items()})
    toks = tokenize_stack(states, token_size=7)  # rows of 10, 73, 33, 17 values: every layer is padded
    assert not toks.mask.all()
    feats, names = weight_statistics(toks.tokens, toks.layout)
    garbage = toks.tokens.clone()
    garbage[:, ~toks.mask] = 1e6
    np.testing.assert_array_equal(weight_statistics(garbage, toks.layout)[0], feats)

    layers = [(s.key, s.bias_key) for s in toks.layout.layers]
    assert len(names) == feats.shape[1] == sum(len(STAT_NAMES) * (1 + (b is not None)) for _, b in layers)
    for b, sd in enumerate(states):
        expect = []
        for wkey, bkey in layers:
            for key in (wkey, bkey):
                if key is None:
                    continue
                v = sd[key].double().flatten().numpy()
                expect += [v.mean(), v.var(), *np.percentile(v, PERCENTILES)]
        np.testing.assert_allclose(feats[b], expect, rtol=1e-6, atol=1e-7)

    flat = flat_weights(garbage, toks.mask)
    assert flat.shape == (3, sum(v.numel() for k, v in states[0].items()))
    assert np.abs(flat).max() < 1e5  # no padding in W either
    np.testing.assert_array_equal(np.sort(flat[0]), np.sort(torch.cat([v.flatten() for v in states[0].values()]).numpy()))


def test_tables_render_cells_and_folds():
    table = {"Acc": {"W": 0.5, "s(W)": float("nan")}, "Epoch": {"W": 0.25, "SANE": 0.75}}
    md = table_markdown(table, "R²")
    assert md.splitlines()[0] == "| R² | W | s(W) | SANE |"
    assert "| Acc | 0.500 | n/a | n/a |" in md and "| Epoch | 0.250 | n/a | 0.750 |" in md
    folds = table_csv({"Acc": {"W": (0.5, 0.1)}})
    assert folds.splitlines() == ["target,W,W_std", "Acc,0.5,0.1"]


def test_run_report_shows_the_probe_signal():
    from sane_ray.train.report import loss_curve_png, summary_markdown

    base = {"train_loss": 1.0, "train_reconstruction": 0.9, "train_contrastive": 2.0}
    history = [{"epoch": 1.0, **base}, {"epoch": 2.0, **base, "val_probe_r2": 0.8}, {"epoch": 3.0, **base, "val_probe_r2": 0.6}]
    assert "| val_probe_r2 | 0.6 at epoch 3 (best 0.8; test-accuracy probe on val models) |" in summary_markdown(history)
    assert "val_probe_r2" not in summary_markdown(history[:1])
    assert loss_curve_png(history)[:4] == b"\x89PNG"
