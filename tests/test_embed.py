"""Embedding from an exported run: preprocessing equals the canonical zoo, haloed encoding, spreads."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from zoo_builders import export_untrained_run

from sane_ray.data import DataConfig
from sane_ray.data.shards import iter_checkpoints
from sane_ray.embed import (
    embed_checkpoints,
    embed_tokens,
    halo_plan,
    load_run,
    preprocess,
)
from sane_ray.embed.encode import concat_tokens, summarize
from sane_ray.embed.preprocess import model_tokens, own_stats, run_max_abs
from sane_ray.embed.run import untrained_control
from sane_ray.embed.zoo import (
    EmbedConfig,
    embed_models,
    embed_zoo,
    embedding_matrix,
    read_embeddings,
)
from sane_ray.model import SaneModel, tiny
from sane_ray.probe.config import ProbeConfig
from sane_ray.probe.features import flat_weights
from sane_ray.probe.job import collect
from sane_ray.sample.prompts import Prompt, load_prompts
from sane_ray.model.export import ExportError, export_model
from sane_ray.zoo import native
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.reader import load_model_checkpoints, open_zoo

TOKEN_SIZE = 64  # cnn_digits -> 50 tokens, mlp_digits -> 90 tokens
WINDOW = 16


def _write_zoo(root: str, n: int, epochs: int = 3) -> str:
    """cnn_digits models with random weights drifting over epochs (no training needed)."""
    rows = []
    for i in range(n):
        torch.manual_seed(100 + i)
        net = build_model("cnn_digits")
        for epoch in range(epochs):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            rows.append(native.write_checkpoint(root, f"m{i:02d}", epoch, net.state_dict(),
                                                {"test_acc": 0.1 * epoch + 0.01 * i}, "cnn_digits", {}))
    native.publish_manifest(root, rows)
    return root


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory, ray_cluster):
    """A canonical zoo and a run exported from it (an untrained SANE: preprocessing is what is tested)."""
    root = tmp_path_factory.mktemp("embed")
    cfg = DataConfig(zoo_uri=_write_zoo(str(root / "zoo"), 7), cache_uri=str(root / "cache"), token_size=TOKEN_SIZE,
                     window_size=WINDOW, split_seed=3, num_actors=1, actor_cpus=0.5, stream_cpus=0.5)
    run_uri = str(root / "run")
    prepared = export_untrained_run(cfg, run_uri)
    return prepared, run_uri


def test_preprocess_equals_canonical_tokens(run_setup):
    prepared, run_uri = run_setup
    run = load_run(run_uri, device="cpu")
    assert run.splits() == {m: s for s, ids in prepared.splits.items() for m in ids}
    canonical = list(iter_checkpoints(prepared.canonical))
    assert len(canonical) == sum(sum(v.values()) for v in prepared.canonical.checkpoints.values())
    zoo = open_zoo(prepared.canonical.zoo_uri)
    ref_id = next(iter(prepared.canonical.groups.values())).reference[0]
    for model in zoo.models:
        good, _ = load_model_checkpoints(model)
        toks = preprocess(run, [sd for _, sd in good], model.architecture, model.arch_kwargs)
        rows = [c for c in canonical if c.model_id == model.model_id]
        assert [c.epoch for c in rows] == [c.epoch for c, _ in good]
        for i, row in enumerate(rows):
            assert torch.equal(toks.tokens[i], row.tokens), (model.model_id, row.epoch)
            assert torch.equal(toks.mask, row.mask) and torch.equal(toks.pos, row.pos)
        if model.model_id != ref_id:  # a non-reference model really was permuted
            raw = preprocess(dataclasses.replace(run.preprocessing, align=False), [sd for _, sd in good],
                             model.architecture)
            assert not torch.equal(raw.tokens, toks.tokens)
    one = preprocess(run, good[-1][1], "cnn_digits")  # one state dict -> (N, d_t)
    assert torch.equal(one.tokens, toks.tokens[-1])


def test_one_checkpoint_gets_the_same_tokens_on_every_path(run_setup):
    """Probe, zoo embedding and sampling preprocess a zoo checkpoint through one function: the tokens
    the run trained on, bit for bit, whether the checkpoint comes alone or with its other epochs."""
    prepared, run_uri = run_setup
    run = load_run(run_uri, device="cpu")
    trained_on = {(c.model_id, c.epoch): c.tokens for c in iter_checkpoints(prepared.canonical)}
    zoo = open_zoo(prepared.canonical.zoo_uri)
    ref_id = next(iter(prepared.canonical.groups.values())).reference[0]
    model = next(m for m in zoo.models if m.model_id != ref_id)
    first = model.checkpoints[0]  # not the model's anchor (its last epoch): alone it used to align on itself
    want = trained_on[(model.model_id, first.epoch)]
    whole, alone = model_tokens(run, model), model_tokens(run, model, [first.epoch])
    assert len(whole.good) == len(model.checkpoints) and [c.epoch for c, _ in alone.good] == [first.epoch]
    assert torch.equal(whole.tokens.tokens[0], want) and torch.equal(alone.tokens.tokens[0], want)
    prompts = load_prompts(run, [Prompt(model, first)], run_max_abs(run))  # sampling
    assert torch.equal(prompts.tokens.tokens[0], want)
    (probed,) = collect(run, None, zoo, ProbeConfig(run=run_uri, epochs=[first.epoch], folds=0, control=False)).values()
    row = probed.model_id.index(model.model_id)
    np.testing.assert_array_equal(probed.matrix("W")[row], flat_weights(want[None], alone.tokens.mask)[0])
    by_epoch = {}  # zoo embedding, with and without the other epochs
    for epochs in (None, [first.epoch]):
        table = embed_models(run, [model], cfg=EmbedConfig(epochs=epochs))
        by_epoch[epochs is None] = embedding_matrix(table)[table.column("epoch").to_pylist().index(first.epoch)]
    np.testing.assert_allclose(by_epoch[True], by_epoch[False], rtol=0, atol=1e-6)


def test_unknown_architecture_uses_own_statistics(run_setup, caplog):
    _, run_uri = run_setup
    run = load_run(run_uri, device="cpu")
    torch.manual_seed(5)
    models = [build_model("mlp_digits").state_dict() for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="sane_ray.embed.preprocess"):
        own = own_stats(run.preprocessing, "mlp_digits", {}, [models])
        toks = preprocess(run, models, "mlp_digits", fallback_stats=own)
        assert torch.equal(preprocess(run, models, "mlp_digits").tokens, toks.tokens)  # default: their own stats
    assert sum("do not cover" in r.message for r in caplog.records) == 1  # said once
    assert toks.tokens.shape == (3, 90, TOKEN_SIZE)
    real = toks.tokens[:, toks.mask]
    assert abs(float(real.mean())) < 0.05 and abs(float(real.std()) - 1) < 0.1  # standardized on their own
    assert own_stats(run.preprocessing, "cnn_digits", {}, [models]) is None  # the run's layout
    emb = embed_checkpoints(run, models, "mlp_digits")
    assert emb.mean.shape == (3, run.model.cfg.d_z) and torch.isfinite(emb.mean).all()


def test_halo_plan_covers_every_token_once():
    for n, ws, halo in [(50, 16, 4), (50, 16, 0), (17, 16, 3), (16, 16, 4), (5, 16, 4), (1000, 32, 8)]:
        plan = halo_plan(n, ws, halo)
        covered = torch.cat([torch.arange(lo, hi) for lo, hi in zip(plan.lo.tolist(), plan.hi.tolist())])
        assert torch.equal(covered, torch.arange(n))
        assert ((plan.starts <= plan.lo) & (plan.hi <= plan.starts + ws)).all()
        assert (plan.starts >= 0).all() and (n <= ws or (plan.starts + ws <= n).all())
    plan = halo_plan(50, 16, 4)
    assert plan.starts[0] == 0 and plan.starts[-1] == 50 - 16  # the ends take all their context inwards
    with pytest.raises(ValueError, match="no content"):
        halo_plan(50, 16, 8)


def test_haloed_equals_manual_and_unhaloed_for_short_models(run_setup):
    _, run_uri = run_setup
    run = load_run(run_uri, device="cpu")
    zoo = open_zoo(run.canonical.zoo_uri)
    good = [load_model_checkpoints(m)[0][-1][1] for m in zoo.models[:3]]
    toks = concat_tokens([preprocess(run, sd, "cnn_digits") for sd in good])  # three models: (3, 50, d_t)
    n = toks.tokens.shape[1]
    emb = embed_tokens(run, toks, halo=4, keep_tokens=True, batch_windows=5)  # chunks cut across models
    # manual Algorithm 2: pass by pass, drop the halo, stitch
    plan = halo_plan(n, WINDOW, 4)
    manual = torch.empty(3, n, run.model.cfg.d_z)
    with torch.no_grad():
        for s, lo, hi in zip(plan.starts.tolist(), plan.lo.tolist(), plan.hi.tolist()):
            z = run.model.encode(toks.tokens[:, s : s + WINDOW], toks.pos[s : s + WINDOW].expand(3, -1, -1))
            manual[:, lo:hi] = z[:, lo - s : hi - s]
    torch.testing.assert_close(emb.tokens, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.mean, manual.mean(1), rtol=1e-5, atol=1e-6)
    unhaloed = embed_tokens(run, toks, halo=0, keep_tokens=True)
    assert not torch.allclose(unhaloed.tokens, emb.tokens, atol=1e-4)  # context matters on a long model

    # a model shorter than one window: one padded pass; haloed == unhaloed == whole-sequence encode
    short = [embed_tokens(run, toks, window_size=64, halo=h, keep_tokens=True) for h in (0, 8, 16)]
    for other in short[1:]:
        assert torch.equal(other.tokens, short[0].tokens) and torch.equal(other.mean, short[0].mean)
    with torch.no_grad():
        whole = run.model.encode(toks.tokens, toks.pos.expand(3, -1, -1))
    torch.testing.assert_close(short[0].tokens, whole, rtol=1e-5, atol=1e-6)


def test_layer_spread_is_per_layer_std():
    torch.manual_seed(1)
    z = torch.randn(2, 9, 4)
    layer = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    emb = summarize(z, layer)
    want = torch.stack([z[:, layer == i].std(1, unbiased=False).mean(-1) for i in range(3)], 1)
    torch.testing.assert_close(emb.layer_spread, want)
    torch.testing.assert_close(emb.mean, z.mean(1))
    torch.testing.assert_close(emb.std, z.std(1, unbiased=False))
    assert emb.tokens is None


def test_batched_models_embed_independently(run_setup):
    """A model's embedding does not depend on which other models share its batch."""
    _, run_uri = run_setup
    run = load_run(run_uri, device="cpu")
    zoo = open_zoo(run.canonical.zoo_uri)
    good = [load_model_checkpoints(m)[0][-1][1] for m in zoo.models[:3]]
    together = embed_tokens(run, concat_tokens([preprocess(run, sd, "cnn_digits") for sd in good]))
    alone = embed_checkpoints(run, good[1], "cnn_digits")
    torch.testing.assert_close(together.mean[1:2], alone.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.layer_spread[1:2], alone.layer_spread, rtol=1e-5, atol=1e-6)


def test_run_without_preprocessing_is_refused(tmp_path):
    cfg = dataclasses.replace(tiny(), d_model=32, d_z=8)
    export_model(SaneModel(cfg).state_dict(), cfg, str(tmp_path))
    with pytest.raises(ExportError, match="preprocessing.json"):
        load_run(str(tmp_path), device="cpu")


def test_embed_zoo_actor_pool_equals_in_process(run_setup, tmp_path):
    prepared, run_uri = run_setup
    run = load_run(run_uri, device="cpu")
    zoo = open_zoo(prepared.canonical.zoo_uri)
    cfg = EmbedConfig(models_per_batch=3, num_actors=1, actor_cpus=0.5, keep_tokens=True)
    local = embed_models(run, zoo.models, cfg=cfg)
    out = str(tmp_path / "emb")
    assert embed_zoo(run_uri, zoo.uri, out, cfg) == local.num_rows == zoo.num_checkpoints
    pooled = read_embeddings(out)
    assert pooled.column("model_id").to_pylist() == local.column("model_id").to_pylist()
    assert pooled.column("epoch").to_pylist() == local.column("epoch").to_pylist()
    splits = {m: s for s, ids in prepared.splits.items() for m in ids}
    assert pooled.column("split").to_pylist() == [splits[m] for m in pooled.column("model_id").to_pylist()]
    np.testing.assert_allclose(pooled.column("test_acc").to_numpy(), local.column("test_acc").to_numpy())
    np.testing.assert_allclose(embedding_matrix(pooled), embedding_matrix(local), rtol=1e-5, atol=1e-6)
    spread = embedding_matrix(pooled, "layer_spread")
    (layout,) = [p.layout for p in run.preprocessing.layouts.values()]
    assert spread.shape == (pooled.num_rows, len(layout.layers)) and (spread > 0).all()
    # the stored token latents are the model's stitched sequence; their mean is the embedding
    first = pooled.slice(0, 1).to_pylist()[0]
    z = np.frombuffer(first["tokens"], np.float32).reshape(50, run.model.cfg.d_z)
    np.testing.assert_allclose(z.mean(0), first["embedding"], rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no finished embeddings"):
        read_embeddings(str(tmp_path / "nothing"))


def test_untrained_control_is_a_seeded_fresh_model(run_setup):
    _, run_uri = run_setup
    run = load_run(run_uri, device="cpu")  # the fixture exported SaneModel(cfg) right after manual_seed(0)
    same = untrained_control(run, 0)
    other = untrained_control(run, 1)
    for k, v in run.model.state_dict().items():
        assert torch.equal(same.model.state_dict()[k], v)
    assert not all(torch.equal(other.model.state_dict()[k], v) for k, v in run.model.state_dict().items())
    assert other.preprocessing is run.preprocessing and not other.model.training


def test_zoo_of_an_unseen_architecture_uses_the_zoos_statistics(run_setup, tmp_path):
    """Models of a layout the run lacks are standardized with statistics over all of them, not per model."""
    _, run_uri = run_setup
    run = load_run(run_uri, device="cpu")
    rows = []
    for i in range(2):
        torch.manual_seed(50 + i)
        net = build_model("mlp_digits")
        for epoch in range(2):
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(1.5 + i)  # the two models differ in scale: per-model statistics would hide it
            rows.append(native.write_checkpoint(str(tmp_path / "mlp"), f"x{i}", epoch, net.state_dict(),
                                                {"test_acc": 0.5}, "mlp_digits", {}))
    native.publish_manifest(str(tmp_path / "mlp"), rows)
    zoo = open_zoo(str(tmp_path / "mlp"))
    table = embed_models(run, zoo.models, cfg=EmbedConfig(models_per_batch=1))
    assert table.column("split").to_pylist() == [""] * 4  # the run never saw these models
    ckpts = [[sd for _, sd in load_model_checkpoints(m)[0]] for m in zoo.models]
    shared = own_stats(run.preprocessing, "mlp_digits", {}, ckpts)
    want = embed_tokens(run, preprocess(run, ckpts[1], "mlp_digits", fallback_stats=shared)).mean
    np.testing.assert_allclose(embedding_matrix(table)[2:], want.numpy(), rtol=1e-5, atol=1e-6)
    alone = embed_tokens(run, preprocess(run, ckpts[1], "mlp_digits")).mean
    assert not torch.allclose(alone, want, atol=1e-3)
