"""Sampling: independent per-token KDE draws, BN-conditioning, and the job end to end on Ray."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch
from zoo_builders import build_native_zoo, export_untrained_run

from sane_ray.cli import main
from sane_ray.data import DataConfig
from sane_ray.model import SaneModel, tiny
from sane_ray.sample.config import SampleConfig
from sane_ray.sample.candidates import broken, rank
from sane_ray.sample.job import run_sample
from sane_ray.sample.kde import TokenKDE, rule_factor
from sane_ray.sample.models import bn_condition, check_positions
from sane_ray.sample.novelty import NearestZoo
from sane_ray.weights.tokenize import layout_from_state_dict
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.reader import load_checkpoint, open_zoo
from sane_ray.zoo.tasks import get_task

TOKEN_SIZE, WINDOW = 64, 16


def test_kde_picks_anchor_and_noise_independently_per_token():
    n, d = 4000, 256
    anchors = torch.stack([torch.zeros(n, d), torch.full((n, d), 100.0)])
    draw = TokenKDE(anchors, 1.0, anchor="token").sample([7])[0]
    picked = (draw.mean(1) > 50).float()  # which anchor each token came from
    assert 0.45 < float(picked.mean()) < 0.55  # tokens of ONE candidate come from both prompts
    assert abs(float(torch.corrcoef(torch.stack([picked[:-1], picked[1:]]))[0, 1])) < 0.1
    noise = draw - anchors[picked.long(), torch.arange(n)]
    assert abs(float(noise.mean())) < 0.05 and 0.95 < float(noise.std()) < 1.05
    # no shared noise pattern: token noises are uncorrelated with each other
    corr = torch.corrcoef(noise[:200])
    assert float((corr - torch.eye(200)).abs().max()) < 0.5  # the reference: 1 for every pair
    assert float((corr - torch.eye(200)).abs().mean()) < 0.1

    one = TokenKDE(anchors, 1.0, anchor="model").sample([7, 8])
    for row in one:  # one anchor per candidate, the noise still per token
        assert len(set((row.mean(1) > 50).tolist())) == 1
        assert float((row - row[0]).abs().mean()) > 0.5


def test_kde_draws_depend_on_the_candidate_seed_alone():
    anchors = torch.randn(3, 50, 4)
    kde = TokenKDE.fit(anchors, "scott", anchor="token")
    a = kde.sample([1, 2, 3, 4], threads=1)
    b = kde.sample([1, 2, 3, 4], threads=3)
    assert torch.equal(a, b)
    assert torch.equal(kde.sample([3])[0], a[2])
    assert not torch.equal(a[0], a[1])
    std = anchors.std(0)
    assert torch.allclose(kde.bandwidth, std * rule_factor("scott", 3, 4))
    with pytest.raises(ValueError, match="bandwidth"):
        TokenKDE.fit(anchors[:1], anchor="token")
    gauss = TokenKDE.gaussian(2000, 4, 0.5).sample([0])[0]
    assert abs(float(gauss.std()) - 0.5) < 0.02 and abs(float(gauss.mean())) < 0.02


def test_bn_conditioning_changes_only_running_statistics():
    torch.manual_seed(0)
    net = build_model("cnn_digits_bn")
    net.eval()
    task = get_task("digits")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert bn_condition(net, task.train, batches=3, batch_size=64, generator=torch.Generator().manual_seed(1)) == 2
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stats = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed and changed <= stats
    assert any(k.endswith("running_mean") for k in changed) and any(k.endswith("running_var") for k in changed)
    assert not net.training
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn_condition(build_model("cnn_digits"), task.train, 2, 8, torch.Generator()) == 0


def test_bn_conditioning_with_momentum_blends_into_the_decoded_statistics():
    torch.manual_seed(0)
    net = build_model("cnn_digits_bn")
    bn = net.module_list[1]
    bn.running_mean.fill_(5.0)
    reset = build_model("cnn_digits_bn")
    reset.load_state_dict(net.state_dict())
    task = get_task("digits")
    bn_condition(net, task.train, 1, 64, torch.Generator().manual_seed(1), momentum=0.1)
    bn_condition(reset, task.train, 1, 64, torch.Generator().manual_seed(1))
    fresh = reset.module_list[1].running_mean  # the exact batch mean: nothing of the 5.0 survives
    torch.testing.assert_close(bn.running_mean, 0.9 * 5.0 + 0.1 * fresh)  # the reference's running average
    assert int(bn.num_batches_tracked) == 1 and bn.momentum == 0.1


def _row(i: int, val_acc: float, val_loss: float = 1.0, test_acc: float = 0.5) -> dict:
    return {"model_id": f"c{i}", "hparams_round": 0, "hparams_index": i, "val_acc": val_acc, "val_loss": val_loss,
            "test_acc": test_acc, "test_loss": 1.0, "train_acc": 0.5, "train_loss": 1.0}


def test_ranking_never_keeps_a_broken_candidate():
    nan = float("nan")
    rows = [_row(0, nan), _row(1, 0.3), _row(2, 0.9, val_loss=nan), _row(3, 0.5), _row(4, 0.8, test_acc=float("inf"))]
    kept = rank(rows, 3)
    assert [r["model_id"] for r in rows] == ["c3", "c1", "c0", "c2", "c4"]  # finite first, then broken by draw order
    assert [r["model_id"] for r in kept] == ["c3", "c1"]  # fewer than keep rather than a broken one
    assert [broken(r) for r in rows] == [False, False, True, True, True]
    assert rank([_row(0, nan), _row(1, nan)], 2) == []  # the job then stops: SamplingFailedError, exit 1


def test_positions_beyond_the_run_tables_name_the_setting():
    model = SaneModel(dataclasses.replace(tiny(), d_t=TOKEN_SIZE, max_positions=(40, 64, 256)))
    layout = layout_from_state_dict(build_model("cnn_digits").state_dict(), TOKEN_SIZE)
    with pytest.raises(ValueError, match=r"train.model.max_positions=\[40, 64, 256\]"):
        check_positions(model, layout, "cnn_digits")


def test_the_zoo_streams_past_the_compared_models_with_the_figures_of_the_whole_zoo():
    gen = torch.Generator().manual_seed(0)
    queries, mine = torch.randn(5, 30, generator=gen), [torch.rand(40, generator=gen) < 0.3 for _ in range(2)]
    zoo = [(torch.randn(n, 30, generator=gen), torch.rand(n, 40, generator=gen) < 0.3, [f"m{i}@{e}" for e in range(n)],
            i % 2 == 0) for i, n in enumerate((3, 1, 4, 2, 3))]
    zoo[3][1][1] = zoo[1][1][0]  # a later checkpoint ties the IoU of an earlier one: the earlier one is named
    one = NearestZoo.start(5, 2)
    for model in zoo:  # one zoo model at a time, as a task reads them
        one.add(queries, mine, *model)
    parts = [NearestZoo.start(5, 2) for _ in range(2)]  # two tasks, each a stretch of the zoo, merged in order
    for i, model in enumerate(zoo):
        parts[i >= 2].add(queries, mine, *model)
    merged = NearestZoo.start(5, 2)
    for part in parts:
        merged.merge(part)
    vecs, wrong = torch.cat([z[0] for z in zoo]), torch.cat([z[1] for z in zoo])
    names = [n for z in zoo for n in z[2]]
    trained = torch.tensor([z[3] for z in zoo for _ in z[2]])
    dist = torch.cdist(queries, vecs)  # the whole zoo at once
    for nearest in (one, merged):
        assert nearest.seen == len(names) == 13
        assert torch.allclose(nearest.l2, dist.min(1).values)
        assert nearest.l2_name == [names[int(i)] for i in dist.argmin(1)]
        assert torch.allclose(nearest.train_l2, dist[:, trained].min(1).values)
        for k, w in enumerate(mine):
            iou = (w & wrong).sum(1) / (w | wrong).sum(1)
            assert float(nearest.iou[k]) == pytest.approx(float(iou.max()))
            assert nearest.iou_name[k] == names[int(iou.argmax())]  # argmax: the first of equal ones
    assert math.isnan(NearestZoo.start(5, 2).nearest_train(0))  # no trained model seen


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory, ray_cluster):
    """A BatchNorm CNN zoo and an untrained SANE run exported from it, BN affine weights tokenized."""
    root = tmp_path_factory.mktemp("sample")
    build_native_zoo(str(root / "zoo"), n_models=5, epochs=2, archs=("cnn_digits_bn",))
    cfg = DataConfig(zoo_uri=str(root / "zoo"), cache_uri=str(root / "cache"), token_size=TOKEN_SIZE,
                     window_size=WINDOW, split_seed=1, num_actors=1, actor_cpus=0.5, stream_cpus=0.5,
                     include_bn="affine")
    run_uri = str(root / "run")
    export_untrained_run(cfg, run_uri)
    return root, run_uri


def _csv(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return pacsv.read_csv(io.BytesIO(f.read())).to_pylist()


def test_sample_job_is_reproducible_and_writes_readable_zoos(bn_run, capsys):
    root, run_uri = bn_run
    cfg = SampleConfig(run=run_uri, task="digits", candidates=4, keep=2, bootstrap=1, finetune_epochs=1,
                       prompt_best_k=3, bn_batches=2, candidates_per_task=2, cpus_per_task=0.5, seed=5)
    summaries = [run_sample(dataclasses.replace(cfg, out=str(root / f"out{i}"))) for i in range(2)]
    first, second = (_csv(str(root / f"out{i}" / "candidates.csv")) for i in range(2))
    assert len(first) == 8 and [r["kept"] for r in first].count(True) == 2
    assert first == second  # same seed: same candidates, scores, fine-tuning and novelty
    assert summaries[0]["curves"] == summaries[1]["curves"]
    assert {r["round"] for r in first} == {0, 1}
    kept = [r for r in first if r["kept"]]
    assert all(r["nearest_zoo"] and r["max_iou"] >= 0 and r["noise_baseline_test_acc"] >= 0 for r in kept)

    kept_zoo = open_zoo(str(root / "out0" / "kept"), verify=True)
    assert sorted(m.model_id for m in kept_zoo.models) == sorted(r["model_id"] for r in kept)
    assert all(m.epochs == [0, 1] and m.architecture == "cnn_digits_bn" for m in kept_zoo.models)
    assert len(open_zoo(str(root / "out0" / "candidates")).models) == 8
    # BN affine weights came from the tokens (include_bn "affine"), running statistics from conditioning
    model = kept_zoo.models[0]
    sd = load_checkpoint(model, model.checkpoints[0])
    assert not torch.equal(sd["module_list.1.weight"], torch.ones(8))
    assert not torch.equal(sd["module_list.1.running_var"], torch.ones(8))
    capsys.readouterr()
    assert main(["zoo", "info", "--json", str(root / "out0" / "kept")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "native" and info["models"] == 2
    curves = _csv(str(root / "out0" / "curves.csv"))
    assert {r["group"] for r in curves} == {"sampled", "prompt", "scratch"}
    summary_md = (root / "out0" / "summary.md").read_text()
    assert summary_md.startswith("# Sampling")
    # Memorization baselines beside the kept models, one row per model of each source.
    memo = _csv(str(root / "out0" / "memorization.csv"))
    per_source = {s: sum(r["source"] == s for r in memo) for s in ("sampled", "prompt", "prompt + noise", "prompt average")}
    assert per_source == {"sampled": 2, "prompt": 3, "prompt + noise": 2, "prompt average": 2}
    assert all(0 <= r["test_acc"] <= 1 and r["nearest_train_l2"] >= 0 for r in memo)
    assert "## Memorization baselines" in summary_md and "Do the kept SANE samples beat" in summary_md
    assert (root / "out0" / "memorization.png").read_bytes()[:4] == b"\x89PNG"
    other = run_sample(dataclasses.replace(cfg, seed=6, bootstrap=0, finetune_epochs=0, novelty=False,
                                           out=str(root / "out2")))
    assert other["curves"]["sampled"]["mean"] != summaries[0]["curves"]["sampled"]["mean"]


def _digits_npz(path, classes: int) -> str:
    """The digits task's tensors (already normalized floats: taken as given) with labels below ``classes``."""
    task = get_task("digits")
    arrays = {}
    for split in ("train", "val", "test"):
        part = task.split(split)
        keep = part.y < classes
        arrays[f"x_{split}"], arrays[f"y_{split}"] = part.x[keep].numpy(), part.y[keep].numpy()
    np.savez(path, **arrays)
    return str(path)


def test_a_task_with_other_classes_gets_a_new_fitted_head(bn_run):
    root, run_uri = bn_run
    npz = _digits_npz(root / "five.npz", 5)
    cfg = SampleConfig(run=run_uri, task=npz, candidates=4, keep=2, finetune_epochs=1, prompt_best_k=2,
                       bn_batches=2, candidates_per_task=2, cpus_per_task=0.5, seed=3, out=str(root / "five"))
    summary = run_sample(cfg)
    assert summary["task"]["new_head"] and summary["task"]["num_classes"] == 5
    assert summary["task"]["source"] == npz and summary["task"]["normalization"]["stats"] == "none"
    kept = open_zoo(str(root / "five" / "kept"), verify=True)
    assert all(m.arch_kwargs["num_classes"] == 5 for m in kept.models)
    sd = load_checkpoint(kept.models[0], kept.models[0].checkpoints[0])
    head = [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2][-1]
    assert sd[head].shape[0] == 5
    md = (root / "five" / "summary.md").read_text()
    assert "head fitted" in md and "zero-shot" not in md.split("## Side by side")[1].split("\n\n")[1]
    assert not (root / "five" / "memorization.csv").exists()  # zoo models' heads do not fit 5 classes
    assert set(summary["curves"]) == {"sampled", "prompt", "scratch"}
    with pytest.raises(ValueError, match="5 classes but the zoo.s architecture has 10 outputs"):
        run_sample(dataclasses.replace(cfg, new_head=False, out=str(root / "five-refused")))


def test_the_task_defaults_to_the_zoos_and_a_zoo_without_one_needs_it(bn_run):
    _, run_uri = bn_run
    with pytest.raises(ValueError, match=r"records no task: give the data to score on \(--task"):
        run_sample(SampleConfig(run=run_uri, candidates=2, keep=1, out=str(bn_run[0] / "none")))


def test_a_task_whose_images_do_not_fit_the_architecture_fails_before_sampling(bn_run, tmp_path):
    _, run_uri = bn_run
    rng = np.random.default_rng(0)
    bad = tmp_path / "wide.npz"
    np.savez(bad, **{f"{k}_{s}": (rng.integers(0, 255, (20, 12, 12), dtype=np.uint8) if k == "x" else
                                  np.arange(20) % 10) for s in ("train", "val", "test") for k in ("x", "y")})
    with pytest.raises(ValueError, match=r"wide.npz.*\(1, 12, 12\).*\(1, 8, 8\)") as err:
        run_sample(SampleConfig(run=run_uri, task=str(bad), candidates=2, keep=1, out=str(tmp_path / "o")))
    assert "\n" not in str(err.value)


def test_sample_cli_refuses_bad_settings(bn_run, capsys):
    _, run_uri = bn_run
    assert main(["sample", "--run", run_uri, "--keep", "9", "--candidates", "4"]) == 2
    assert "keep=9 exceeds candidates=4" in capsys.readouterr().err
    assert main(["sample", "--run", run_uri, "--task", "cifar"]) == 2
    assert "not a registered task (digits" in capsys.readouterr().err
