"""Choosing prompts: one architecture, by id, by epoch or the best k, with errors that say what to set."""

from __future__ import annotations

import pytest

from sane_ray.sample.prompts import select_prompts
from sane_ray.zoo.spec import CheckpointRecord, ModelRecord, Zoo


def _zoo() -> Zoo:
    archs = ["cnn_digits", "mlp_digits", "vit_digits"]
    models = [ModelRecord(f"m{i}", archs[i % 3], {"num_classes": 10},
                          checkpoints=[CheckpointRecord(f"m{i}", e, f"/z/m{i}/{e}", {"val_acc": 0.1 * i + 0.01 * e})
                                       for e in range(3)]) for i in range(9)]
    return Zoo(uri="/z", format="native", models=models)


def test_a_mixed_zoo_prompts_one_architecture():
    best = select_prompts(_zoo(), best_k=2)
    assert [p.name for p in best] == ["m8@2", "m5@2"]  # the best model's architecture (vit: m2, m5, m8)
    mlp = select_prompts(_zoo(), best_k=2, architecture="mlp_digits")
    assert [p.name for p in mlp] == ["m7@2", "m4@2"]
    assert [p.name for p in select_prompts(_zoo(), architecture="cnn_digits", epoch=1)] == ["m0@1", "m3@1", "m6@1"]
    with pytest.raises(ValueError, match="prompts differ in architecture"):
        select_prompts(_zoo())
    with pytest.raises(ValueError, match="has no 'resnet_digits' model .it has cnn_digits, mlp_digits, vit_digits"):
        select_prompts(_zoo(), architecture="resnet_digits")
