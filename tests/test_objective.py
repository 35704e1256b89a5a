"""The reconstruction objective's options (normalization, target) and the `paper` preset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sane_ray.cli import main
from sane_ray.model import SaneConfig, SaneModel, masked_mse, tiny
from sane_ray.model.losses import masked_errors
from sane_ray.train.runtime import select_runtime
from sane_ray.train.step import compute_loss
from sane_ray.weights.augment import multiplicative_noise

CPU = select_runtime(use_gpu=False, cpu_bf16=False)  # fp32: compared with fp32 references
CFG = dataclasses.replace(tiny(), window_size=6)


def _padded_batch(seed: int = 0, b: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CFG.window_size, CFG.d_t, generator=g)
    mask = torch.rand(b, CFG.window_size, CFG.d_t, generator=g) > 0.4
    return {"x_i": x * mask, "x_j": -x * mask, "mask": mask,
            "pos": torch.randint(0, 20, (b, CFG.window_size, 3), generator=g)}


def _zero_output_model(cfg: SaneConfig) -> SaneModel:
    """A model whose reconstruction is 0 everywhere: its loss is the target's mean square."""
    model = SaneModel(cfg).eval()
    torch.nn.init.zeros_(model.decoder.out.weight)
    torch.nn.init.zeros_(model.decoder.out.bias)
    return model


def test_mse_over_all_entries_divides_by_every_entry():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = torch.tensor([[1.0, 0.0, 9.0], [4.0, 7.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert masked_mse(x, y, mask, over="all").item() == pytest.approx((0 + 4 + 0 + 4) / 6)
    assert masked_mse(x, y, mask, over="real").item() == pytest.approx((0 + 4 + 0 + 4) / 4)
    with pytest.raises(ValueError, match="unknown reconstruction normalization 'mean'"):
        masked_mse(x, y, mask, over="mean")


def test_the_normalizations_differ_only_in_how_the_same_errors_are_averaged():
    b = _padded_batch()
    x_hat, target, mask = b["x_j"] + 0.3, b["x_i"], b["mask"]
    errors = masked_errors(x_hat, target, mask)
    assert all(torch.allclose(errors[k], masked_mse(x_hat, target, mask, k)) for k in errors)
    m = mask.float()
    assert torch.allclose(errors["real"] * m.sum() / m.numel(), errors["all"])
    per_token = ((x_hat - target) ** 2 * m).sum(-1) / m.sum(-1).clamp_min(1)
    assert torch.allclose(errors["token"], per_token[m.sum(-1) > 0].mean())
    assert len({round(float(v), 6) for v in errors.values()}) == 3  # the padded batch tells all three apart


def test_per_token_normalization_weighs_a_mostly_padded_token_like_a_full_one():
    target = torch.zeros(1, 2, 4)
    mask = torch.tensor([[[True] * 4, [True, False, False, False]]])
    x_hat = torch.tensor([[[1.0] * 4, [3.0, 0, 0, 0]]])  # per-entry errors 1 (full token) and 9 (one-entry token)
    assert masked_mse(x_hat, target, mask, "real").item() == pytest.approx((4 + 9) / 5)
    assert masked_mse(x_hat, target, mask, "token").item() == pytest.approx((1 + 9) / 2)


@pytest.mark.parametrize("over", ["real", "all"])
def test_reconstruction_target_is_the_clean_or_the_noisy_views(over):
    batch = _padded_batch(seed=1)
    clean = torch.cat([batch["x_i"], batch["x_j"]])
    mask = torch.cat([batch["mask"], batch["mask"]])
    noisy = multiplicative_noise(clean, CFG.noise_sigma, torch.Generator().manual_seed(5))
    losses = {}
    for target, expected_target in (("clean", clean), ("noisy", noisy)):
        cfg = dataclasses.replace(CFG, reconstruction_target=target, reconstruction_norm=over)
        parts = compute_loss(_zero_output_model(cfg), batch, cfg, CPU, noise=torch.Generator().manual_seed(5))
        expected = masked_mse(torch.zeros_like(clean), expected_target, mask, over)
        assert torch.allclose(parts.reconstruction, expected)
        losses[target] = parts.reconstruction
    assert not torch.allclose(losses["clean"], losses["noisy"])


def test_unknown_objective_settings_are_named():
    with pytest.raises(ValueError, match="reconstruction_norm must be one of real, all"):
        SaneConfig(reconstruction_norm="sum")
    with pytest.raises(ValueError, match="reconstruction_target must be one of clean, noisy"):
        SaneConfig(reconstruction_target="both")


def test_paper_preset_takes_the_references_objective_and_optimizer(monkeypatch):
    from sane_ray import pretrain

    seen = []
    monkeypatch.setattr(pretrain, "run_pretrain", seen.append)
    assert main(["pretrain", "--preset", "paper", "--epochs", "3"]) == 0
    assert main(["pretrain"]) == 0
    paper, default = seen
    assert (paper.train.model.reconstruction_norm, paper.train.model.reconstruction_target) == ("all", "noisy")
    assert (paper.train.optim.weight_decay, paper.train.optim.betas, paper.train.optim.grad_clip) == (3e-9, (0.9, 0.999), 0.0)
    assert paper.train.epochs == 3
    # Today's default stays: real-entry mean, clean target, wd 0.1, betas (0.9, 0.95), clipping at 1.
    assert (default.train.model.reconstruction_norm, default.train.model.reconstruction_target) == ("real", "clean")
    assert (default.train.optim.weight_decay, default.train.optim.betas, default.train.optim.grad_clip) == (0.1, (0.9, 0.95), 1.0)
    # Everything else is the main job's: the two presets differ only in objective, optimizer (and --epochs here).
    as_default = dataclasses.replace(
        paper.train, epochs=default.train.epochs, optim=default.train.optim,
        model=dataclasses.replace(paper.train.model, reconstruction_norm="real", reconstruction_target="clean"))
    assert as_default == default.train
    assert paper.data == default.data


def test_validation_reports_the_reconstruction_under_both_normalizations(ray_cluster):
    import ray

    from sane_ray.train.config import TrainConfig
    from sane_ray.train.loop import _evaluate

    batch = _padded_batch(seed=2, b=4)
    rows = [{k: v[i].numpy() for k, v in batch.items()} for i in range(4)]
    ds = ray.data.from_items(rows)
    real = all_ = None
    for over in ("real", "all"):
        model_cfg = dataclasses.replace(CFG, reconstruction_norm=over)
        torch.manual_seed(0)
        model = SaneModel(model_cfg).eval()
        cfg = TrainConfig(model=model_cfg, batch_size=8)
        metrics = _evaluate(model, ds, cfg, CPU, torch.device("cpu"), None, False)
        with torch.no_grad():
            out = model(torch.cat([batch["x_i"], batch["x_j"]]), torch.cat([batch["pos"]] * 2),
                        torch.cat([batch["mask"]] * 2).any(dim=-1))
        clean, mask = torch.cat([batch["x_i"], batch["x_j"]]), torch.cat([batch["mask"]] * 2)
        real = masked_mse(out.x_hat, clean, mask, "real").item()
        all_ = masked_mse(out.x_hat, clean, mask, "all").item()
        assert metrics["val_reconstruction"] == pytest.approx(real, rel=1e-5)
        assert metrics["val_reconstruction_all"] == pytest.approx(all_, rel=1e-5)
        fraction = mask.float().mean().item()
        assert np.isclose(metrics["val_reconstruction_all"], metrics["val_reconstruction"] * fraction, rtol=1e-5)
    assert real != all_


def test_digits_wide_preset_widens_only_the_model(monkeypatch):
    from sane_ray import pretrain

    seen = []
    monkeypatch.setattr(pretrain, "run_pretrain", seen.append)
    assert main(["pretrain", "--preset", "digits_wide"]) == 0
    assert main(["pretrain"]) == 0
    wide, default = seen
    assert (wide.train.model.d_model, wide.train.model.d_z) == (256, 128)
    assert dataclasses.replace(wide.train.model, d_model=default.train.model.d_model,
                               d_z=default.train.model.d_z) == default.train.model
    assert (wide.data, wide.run, wide.train.optim) == (default.data, default.run, default.train.optim)
