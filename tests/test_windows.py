"""Windows, row interleaving, splits and data settings: pure torch/numpy, no Ray."""

import pytest
import torch

from sane_ray.data.config import DataConfig
from sane_ray.data.splits import SplitError, split_models, split_sizes
from sane_ray.data.windows import (
    balanced_counts,
    WindowSizeError,
    check_window_size,
    gather_windows,
    interleave_rows,
    plan_windows,
    window_index,
    windows_per_checkpoint,
)

D = 4  # token size in these tests


def block(lengths: list[int]):
    """A block of rows whose token values encode (row, token) so gathers can be checked exactly."""
    lengths_t = torch.tensor(lengths)
    offsets = torch.cumsum(lengths_t, 0) - lengths_t
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
    local = torch.arange(int(lengths_t.sum())) - offsets[rows]
    flat = (rows * 1000 + local).float()[:, None].repeat(1, D)
    return flat, offsets, lengths_t


def cut(lengths, counts, ws, model_codes=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flat, offsets, lens = block(lengths)
    codes = torch.arange(len(lengths)) if model_codes is None else torch.tensor(model_codes)
    plan = plan_windows(lens, torch.tensor(counts), ws, interleave_rows(codes, gen), gen)
    local, valid = window_index(plan, lens, ws)
    # one layout per row here: the mask table marks the first 3 entries real, positions (n, 7, 9)
    mask_table = torch.zeros(int(lens.sum()), D, dtype=torch.bool)
    mask_table[:, :3] = True
    pos_table = torch.stack([torch.arange(int(lens.sum())), torch.full_like(flat[:, 0], 7).long(),
                             torch.full_like(flat[:, 0], 9).long()], 1)
    index = offsets[plan.rows][:, None] + local
    (x,), mask, pos = gather_windows([flat], index, mask_table, pos_table, index, valid, torch.tensor([99, 98, 97]))
    return plan, x, mask, pos, valid


def test_windows_are_consecutive_tokens_of_their_row():
    plan, x, mask, pos, valid = cut([20, 30, 25], [3, 3, 3], ws=8)
    assert x.shape == (9, 8, D) and mask.shape == (9, 8, D) and pos.shape == (9, 8, 3)
    assert x.dtype == torch.float32 and mask.dtype == torch.bool and pos.dtype == torch.int64
    assert valid.all()
    lengths = torch.tensor([20, 30, 25])
    assert ((plan.starts >= 0) & (plan.starts <= lengths[plan.rows] - 8)).all()
    expected = plan.rows[:, None] * 1000 + plan.starts[:, None] + torch.arange(8)
    assert torch.equal(x[..., 0], expected.float())
    assert torch.equal(mask[..., :3], torch.ones(9, 8, 3, dtype=torch.bool)) and not mask[..., 3].any()
    offsets = torch.tensor([0, 20, 50])
    assert torch.equal(pos[..., 0], offsets[plan.rows][:, None] + plan.starts[:, None] + torch.arange(8))
    assert (pos[..., 1] == 7).all()


def test_round_robin_emits_each_row_once_per_round():
    plan, *_ = cut([40] * 5, [4] * 5, ws=8)
    rounds = plan.rows.view(4, 5)
    for r in rounds:
        assert sorted(r.tolist()) == list(range(5))
    assert (rounds == rounds[0]).all()  # same order every round: any 5 consecutive windows are distinct rows
    for i in range(len(plan.rows) - 5):
        assert len(set(plan.rows[i : i + 5].tolist())) == 5


def test_checkpoints_of_one_model_are_spread_apart():
    # 4 models x 3 checkpoints, stored model by model; within a round no model repeats in any 4 rows
    codes = [m for m in range(4) for _ in range(3)]
    plan, *_ = cut([16] * 12, [1] * 12, ws=8, model_codes=codes)
    models = torch.tensor(codes)[plan.rows]
    for i in range(len(models) - 3):
        assert len(set(models[i : i + 4].tolist())) == 4


def test_short_models_are_padded_with_unmasked_pad_positions():
    plan, x, mask, pos, valid = cut([5, 12], [1, 1], ws=8)
    short = int((plan.rows == 0).nonzero())
    assert plan.starts[short] == 0
    assert valid[short, :5].all() and not valid[short, 5:].any()
    assert (x[short, 5:] == 0).all() and not mask[short, 5:].any()
    assert (pos[short, 5:] == torch.tensor([99, 98, 97])).all()
    assert torch.equal(x[short, :5, 0], torch.arange(5).float())
    assert mask[short, :5, :3].all()
    assert valid[1 - short].all()  # the long row is never padded


def test_mixed_counts_and_fresh_draws():
    plan, *_ = cut([100, 10], [5, 1], ws=10, seed=1)
    assert (plan.rows == 0).sum() == 5 and (plan.rows == 1).sum() == 1
    other, *_ = cut([100, 10], [5, 1], ws=10, seed=2)
    assert not torch.equal(plan.starts, other.starts)


def test_window_settings_errors_name_the_setting():
    assert windows_per_checkpoint(50, 16) == 3
    assert windows_per_checkpoint(10, 32) == 1
    assert windows_per_checkpoint(50, 16, override=7) == 7
    assert windows_per_checkpoint(10, 16, override=7) == 1  # a whole (padded) model: one window
    check_window_size(50, {"cnn": 50, "mlp": 20})
    with pytest.raises(WindowSizeError, match=r"window_size=64 .*\(longest: cnn with 50 tokens\)"):
        check_window_size(64, {"cnn": 50, "mlp": 20})


def test_splits_are_disjoint_deterministic_and_by_model():
    ids = [f"m{i:03d}" for i in range(20)]
    a = split_models(ids, (0.7, 0.15, 0.15), seed=3)
    assert [len(a[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    assert sorted(sum(a.values(), [])) == ids
    assert split_models(list(reversed(ids)), (0.7, 0.15, 0.15), seed=3) == a  # input order is irrelevant
    assert split_models(ids, (0.7, 0.15, 0.15), seed=4) != a
    assert split_sizes(3, (0.7, 0.15, 0.15)) == (1, 1, 1)
    assert split_sizes(5, (0.8, 0.2, 0.0)) == (4, 1, 0)
    with pytest.raises(SplitError, match="has 2 usable model.*need at least 3"):
        split_models(ids[:2], (0.7, 0.15, 0.15), seed=0)


def test_data_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="token_size"):
        DataConfig(token_size=0)
    with pytest.raises(ValueError, match="split_fractions"):
        DataConfig(split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="windows_per_model_epoch"):
        DataConfig(windows_per_model_epoch=0)
    a, b = DataConfig(window_size=8), DataConfig(window_size=16)
    assert a.canonical_settings() == b.canonical_settings()  # stream settings are not part of the cache key
    assert DataConfig(token_size=8).canonical_settings() != a.canonical_settings()
    assert not DataConfig(skip_epoch_zero=True).uses_epoch(0) and DataConfig(epochs=[2]).uses_epoch(2)


def test_balanced_counts_give_each_architecture_its_weighted_share_of_a_pass():
    base, rows = [1, 12], [30, 10]  # a 1-window model and a 12-window one: unbalanced 30 vs 120 windows
    counts = balanced_counts(base, rows, [1.0, 1.0])
    assert sum(r * c for r, c in zip(rows, counts)) == pytest.approx(150, abs=10)  # the pass keeps its length
    assert counts == [2, 8] and rows[0] * counts[0] < rows[1] * counts[1] < 2 * rows[0] * counts[0]
    assert balanced_counts(base, rows, [1.0, 4.0]) == [1, 12]  # weights 1:4 are what the sizes gave anyway
    assert balanced_counts([5], [7], [3.0]) == [5] and balanced_counts(base, [30, 0], [1, 1]) == base


def test_architecture_weights_are_per_architecture_and_checked():
    from sane_ray.data.draw import architecture_weights
    from sane_ray.data.format import LayoutGroup

    groups = [LayoutGroup("a", "{}", "cnn_digits", "{}", ("cnn_digits", "cnn_digits_bn")),
              LayoutGroup("b", "{}", "vit_digits", "{}", ("vit_digits",))]
    assert architecture_weights(groups, {}) == [2.0, 1.0]
    assert architecture_weights(groups, {"vit_digits": 3}) == [2.0, 3.0]
    with pytest.raises(ValueError, match="names mlp_digits, not in the zoo"):
        architecture_weights(groups, {"mlp_digits": 1})
    with pytest.raises(ValueError, match="architecture_weights must be > 0"):
        DataConfig(architecture_weights={"vit_digits": 0})


def test_a_mixed_zoo_splits_per_architecture_as_each_alone_would():
    cnn, vit = [f"c{i:02d}" for i in range(20)], [f"v{i:02d}" for i in range(10)]
    strata = {**dict.fromkeys(cnn, "cnn_digits"), **dict.fromkeys(vit, "vit_digits")}
    mixed = split_models(cnn + vit, (0.7, 0.15, 0.15), 3, strata)
    alone = [split_models(ids, (0.7, 0.15, 0.15), 3) for ids in (cnn, vit)]
    assert mixed == {s: sorted(alone[0][s] + alone[1][s]) for s in mixed}
    assert split_models(cnn, (0.7, 0.15, 0.15), 3, dict.fromkeys(cnn, "cnn_digits")) == alone[0]
    with pytest.raises(SplitError, match="architecture vit_digits: the zoo has 2 usable model"):
        split_models(cnn + vit[:2], (0.7, 0.15, 0.15), 3, strata)
