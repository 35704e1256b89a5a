"""The probe job: embed a zoo with a pretrained run, probe model properties, write the paper's tables.

For every checkpoint of the zoo (the epochs the run trained on, unless configured) the
job computes, from the same preprocessed tokens: the flattened weights W, the weight
statistics s(W), the SANE embedding (mean over tokens, haloed; and with the tokens' std
beside it), SANE's full token
sequence (Table 10, when small), and the embedding of an untrained SANE of the run's
config seeded as the run was (the control: what pretraining adds). Linear probes then
predict test accuracy, epoch and generalization gap (R^2 on the test split: the run's own
test models plus any it never saw, so no model the run trained on is tested, see
:func:`model_splits`; plus a grouped k-fold estimate) and, where the
zoo records them, the models' hyperparameters.

Models are processed one at a time (all checkpoints of a model at once, as the run
aligned them), so memory holds only the per-checkpoint features.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import yaml

from sane_ray import lease, storage
from sane_ray.config import dump_config
from sane_ray.data.splits import split_models
from sane_ray.embed import Run, embed_tokens, load_run
from sane_ray.embed.preprocess import (checkpoints_at, model_tokens, population_stats, run_max_abs, run_settings,
                                      uncovered_layers)
from sane_ray.embed.run import untrained_control
from sane_ray.probe import mixed, report
from sane_ray.probe.config import ProbeConfig
from sane_ray.probe.data import (CHANCE, CONTROL, CONTROL_LAYER, FULL, IDENTIFIERS, LAYER_MEAN, LAYER_MEAN_STD, MAX_CLASSES, MEAN_STD,
                              SANE, SELECTED, TARGETS, TEST_MAJORITY, VARIANTS, ProbeData, ProbeResults)
from sane_ray.probe.features import flat_weights, layer_moments, num_weights, weight_statistics
from sane_ray.probe.linear import (FoldScores, classifier_probe, grouped_kfold, nested_kfold_selection, ridge_probe,
                                   select_on_validation)
from sane_ray.weights.tokenize import TokenLayout
from sane_ray.zoo.reader import open_zoo
from sane_ray.zoo.spec import ModelRecord, Zoo

log = logging.getLogger("sane_ray.probe")

def _run_document(run_uri: str) -> dict[str, Any]:
    """The run's resolved pretraining config (``pretrain_config.yaml``), {} if the export has none."""
    uri = storage.join(run_uri, "pretrain_config.yaml")
    return yaml.safe_load(storage.read_bytes(uri)) if storage.exists(uri) else {}


def model_splits(run: Run, models: Sequence[ModelRecord]) -> tuple[dict[str, str], str, set[str]]:
    """Split of every probed model (those with usable checkpoints), how it was made, and which
    probed models the run split (pretrained on or held out by it).

    The run's recorded split owns every model it covers: its training, validation and test
    models keep their split. Models it never split (another zoo's, a superset of its zoo's,
    models its pretraining dropped) are *unseen* and join the test split only, so no model the
    run trained on is ever a test model and unseen models never reshuffle the run's. A model is
    the run's when its id is in the split and, where both zoos record checkpoint digests, they
    share a checkpoint: two zoos generated with different seeds reuse the same model ids. A zoo
    the run shares no model with is split afresh by model with the run's fractions and split seed.
    """
    known = run.splits()
    recorded = run.canonical.digests if run.canonical is not None else {}

    def is_the_runs(model: ModelRecord) -> bool:
        theirs, ours = set(recorded.get(model.model_id, ())), model.digests()
        return model.model_id in known and (not theirs or not ours or bool(theirs.intersection(ours)))

    model_ids = [m.model_id for m in models]
    seen = {m.model_id for m in models if is_the_runs(m)}
    reused = sum(m.model_id in known and m.model_id not in seen for m in models)
    other = f" ({reused} share an id with one of the run's models but none of its checkpoints)" if reused else ""
    if not seen:
        s = run_settings(run)
        fractions = tuple(s.get("split_fractions", (0.7, 0.15, 0.15)))
        seed = int(s.get("split_seed", 42))
        fresh = split_models(model_ids, fractions, seed, {m.model_id: m.architecture for m in models})
        how = (f"a fresh split by model ({'/'.join(f'{f:g}' for f in fractions)}, the run's split seed {seed}): "
               f"the run was pretrained on none of these models{other}")
        log.info("probe: %s", how)
        return {mid: name for name, members in fresh.items() for mid in members}, how, seen
    split = {mid: known[mid] if mid in seen else "test" for mid in model_ids}
    for name in ("train", "val"):
        if name not in split.values():
            raise ValueError(f"probe: none of the {len(seen)} probed model(s) the run split is a {name} model; "
                             "the probe fits on the run's training models and picks alpha on its validation models")
    unseen = len(model_ids) - len(seen)
    how = "the run's own split" + (f"; {unseen} model(s) the run never split joined the test split{other}"
                                   if unseen else "")
    if unseen:
        log.info("probe: %s", how)
    return split, how, seen


def _hyperparameters(model: ModelRecord) -> dict[str, Any]:
    d = {**model.hparams, **{f"arch:{k}": v for k, v in model.arch_kwargs.items()}}
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool))}


def architecture_labels(run: Run, models: Sequence[ModelRecord]) -> dict[str, str]:
    """Model id -> the name its architecture group goes by in the report: the registry name, with
    the layout id beside it where one name has several token layouts (e.g. MLPs of two widths)."""
    lid = {m.model_id: run.preprocessing.layout_id(m.architecture, m.arch_kwargs) for m in models}
    layouts_of: dict[str, set[str]] = {}
    for m in models:
        layouts_of.setdefault(m.architecture, set()).add(lid[m.model_id])
    return {m.model_id: m.architecture if len(layouts_of[m.architecture]) == 1
            else f"{m.architecture} [{lid[m.model_id][:8]}]" for m in models}


def collect(run: Run, control: Run | None, zoo: Zoo, cfg: ProbeConfig) -> dict[str, ProbeData]:
    """Preprocess (:func:`~sane_ray.embed.preprocess.model_tokens`), featurize and embed every
    selected checkpoint of ``zoo``, model by model, into one :class:`ProbeData` per architecture
    (:func:`architecture_labels`; W and s(W) need one layout); splits are assigned afterwards."""
    max_abs = run_max_abs(run)
    selected = [dataclasses.replace(m, checkpoints=checkpoints_at(run, m, cfg.epochs)) for m in zoo.models]
    fallback = population_stats(run, selected, max_abs=max_abs)
    labels = architecture_labels(run, zoo.models)
    out: dict[str, ProbeData] = {}
    n, t0, rows = len(zoo.models), time.perf_counter(), 0
    every = max(1, n // 10)
    for i, (model, chosen) in enumerate(zip(zoo.models, selected), 1):
        data = out.setdefault(labels[model.model_id], ProbeData(fallback=fallback))
        lid = run.preprocessing.layout_id(model.architecture, model.arch_kwargs)
        mt = model_tokens(run, model, chosen.epochs, max_abs=max_abs, fallback_stats=fallback.get(lid))
        if mt.skipped:
            data.notes.append(f"{model.model_id}: {len(mt.skipped)} checkpoint(s) skipped ({mt.skipped[0].reason})")
        if mt.tokens is None:
            if chosen.checkpoints:
                data.notes.append(f"{model.model_id}: left out (no usable checkpoint at the selected epochs)")
        else:
            _add_model(data, run, control, model, mt, cfg, labels[model.model_id], lid in fallback)
            rows += len(mt.good)
        if i % every == 0 or i == n:
            log.info("probe: %d/%d models embedded (%d checkpoints) in %.1fs", i, n, rows, time.perf_counter() - t0)
    out = {label: d for label, d in out.items() if d.epoch}
    if not out:
        raise ValueError(f"zoo {zoo.uri} has no usable checkpoint at the selected epochs")
    for data in out.values():
        if not data.full_ok:
            data.features.pop(FULL, None)
        if not data.flat_ok:
            data.notes.append(f"W skipped: {data.weights_per_model:,} weights per model > max_flat_features "
                              f"{cfg.max_flat_features:,}")
    return out


def _add_model(data: ProbeData, run: Run, control: Run | None, model: ModelRecord, mt: Any, cfg: ProbeConfig,
               label: str, fallback: bool) -> None:
    """One model's rows and features; its architecture's first model fixes the layer names and the limits."""
    toks = mt.tokens
    if not data.layer_names:
        data.layer_names = [s.key.removesuffix(".weight") for s in toks.layout.layers]
        data.weights_per_model = num_weights(toks.mask)
        data.flat_ok = data.weights_per_model <= cfg.max_flat_features
        data.notes += _uncovered_notes(run, toks.layout, model, fallback)
    feats, emb = _features(run, control, toks, cfg, data.flat_ok)
    data.full_ok = data.full_ok and emb.tokens[0].numel() <= cfg.max_flat_features
    if not data.full_ok:
        feats.pop(FULL)
    for k, v in feats.items():
        data.features.setdefault(k, []).append(v)
    data.spread.append(emb.layer_spread.cpu().numpy())
    for ckpt, _ in mt.good:
        data.model_id.append(model.model_id)
        data.arch.append(label)
        data.epoch.append(ckpt.epoch)
        for key in data.metrics:
            data.metrics[key].append(float(ckpt.metrics.get(key, math.nan)))
        data.hparams.append(_hyperparameters(model))


def _features(run: Run, control: Run | None, toks: Any, cfg: ProbeConfig, flat_ok: bool) -> tuple[dict[str, Any], Any]:
    """Every feature set of one model's checkpoints (``toks``: their tokens), and its embeddings."""
    window = cfg.window_size or None
    emb = embed_tokens(run, toks, window_size=window, halo=cfg.halo, keep_tokens=True)
    layer_of = toks.pos[:, 1]
    feats = {"s(W)": weight_statistics(toks.tokens, toks.layout)[0], SANE: emb.mean.cpu().numpy(),
             MEAN_STD: torch.cat([emb.mean, emb.std], 1).cpu().numpy(),
             LAYER_MEAN: layer_moments(emb.tokens, layer_of),
             LAYER_MEAN_STD: layer_moments(emb.tokens, layer_of, with_std=True)}
    if flat_ok:
        feats["W"] = flat_weights(toks.tokens, toks.mask)
    feats[FULL] = emb.tokens.flatten(1).cpu().numpy()  # a view; the caller drops it once it is too wide
    if control is not None:
        ctl = embed_tokens(control, toks, window_size=window, halo=cfg.halo, keep_tokens=True)
        feats[CONTROL] = ctl.mean.cpu().numpy()
        feats[CONTROL_LAYER] = layer_moments(ctl.tokens, layer_of)
    return feats, emb


def _uncovered_notes(run: Run, layout: TokenLayout, model: ModelRecord, fallback: bool) -> list[str]:
    """The report's line on layers the run's statistics do not cover (none for the run's own layouts)."""
    layers = uncovered_layers(run.preprocessing, layout) if fallback else []
    if not layers:
        return []
    return [f"{model.architecture} {model.arch_kwargs}: the run's statistics do not cover layer(s) "
            f"{', '.join(layers)}; they are standardized with statistics pooled over every probed checkpoint "
            "of that architecture (`fallback_stats.json`)"]


def _methods(data: ProbeData) -> list[str]:
    order = ["W", "s(W)", SANE, MEAN_STD, LAYER_MEAN, LAYER_MEAN_STD, FULL, CONTROL, CONTROL_LAYER]
    return [m for m in order if m in data.features]


def hyperparameter_targets(data: ProbeData) -> dict[str, tuple[np.ndarray, bool]]:
    """Hyperparameters that vary over the zoo: ``name -> (values per row, categorical)``.

    Numeric ones with more than 10 distinct values are regressed (log10 when positive and
    spanning more than a decade, like learning rates); the rest are classes. A key whose
    values repeat another key's (e.g. ``model::nlin`` and the architecture's ``activation``) is dropped.
    """
    # The zoo's own hyperparameter names first, so a repeat in the architecture arguments is the one dropped.
    keys = sorted({k for h in data.hparams for k in h if k.split(":")[-1] not in IDENTIFIERS},
                  key=lambda k: (k.startswith("arch:"), k))
    out: dict[str, tuple[np.ndarray, bool]] = {}
    seen: list[list[str]] = []
    for key in keys:
        raw = [h.get(key) for h in data.hparams]
        as_str = [str(v) for v in raw]
        distinct = set(as_str)
        if len(distinct) < 2 or as_str in seen:
            continue
        seen.append(as_str)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        name = key.removeprefix("arch:")
        if numeric and len(distinct) > 10:
            y = np.asarray(raw, dtype=np.float64)
            if y.min() > 0 and y.max() / y.min() > 10:
                out[f"log10 {name}"] = (np.log10(y), False)
            else:
                out[name] = (y, False)
        elif len(distinct) <= MAX_CLASSES:
            out[name] = (np.asarray(as_str, dtype=object), True)
    return out


def _select(scores: dict[str, dict[str, float]], val: dict[str, dict[str, float]], row: str) -> str:
    """Copy the SANE variant with the best validation score into the :data:`SELECTED` column of ``row``."""
    best = select_on_validation({m: val[row][m] for m in VARIANTS if m in val[row]})
    scores[row][SELECTED], val[row][SELECTED] = scores[row][best], val[row][best]
    return best


def probe(data: ProbeData, cfg: ProbeConfig) -> ProbeResults:
    """All probes on collected features; which SANE embedding variant counts is chosen on validation only."""
    split = np.asarray(data.split)
    groups = np.asarray(data.model_id)
    test: dict[str, dict[str, float]] = {row: {} for row in TARGETS}
    val: dict[str, dict[str, float]] = {row: {} for row in TARGETS}
    alphas: dict[str, dict[str, float]] = {row: {} for row in TARGETS}
    kfold: dict[str, dict[str, tuple[float, float]]] = {row: {} for row in TARGETS}
    folds: dict[str, dict[str, FoldScores]] = {row: {} for row in TARGETS}
    points = {}
    for method in _methods(data):
        x = data.matrix(method)
        for row, key in TARGETS.items():
            res = ridge_probe(x, data.target(key), split, name=f"{row} from {method}")
            test[row][method], val[row][method], alphas[row][method] = res.score, res.val_score, res.alpha
            if row == "Acc":
                points[method] = (res.test_true, res.test_pred, res.score)
            if cfg.folds:
                f = grouped_kfold(x, data.target(key), groups, cfg.folds, cfg.seed, name=f"{row} from {method}")
                kfold[row][method], folds[row][method] = (f.mean, f.std), f
        log.info("probe: %s done (test R^2 Acc %.3f)", method, test["Acc"][method])
    selected = {row: _select(test, val, row) for row in TARGETS}
    kfold_selected = {}
    if cfg.folds:
        for row in TARGETS:
            nested, kfold_selected[row] = nested_kfold_selection({m: folds[row][m] for m in VARIANTS
                                                                  if m in folds[row]})
            kfold[row][SELECTED] = (nested.mean, nested.std)
    hp: dict[str, dict[str, float]] = {}
    for name, (y, categorical) in hyperparameter_targets(data).items():
        row = f"{name} ({'accuracy' if categorical else 'R²'})"
        hp[row], val[row] = {}, {}
        for method in _methods(data):
            fit = (classifier_probe if categorical else ridge_probe)(data.matrix(method), y, split, name=name)
            hp[row][method], val[row][method] = fit.score, fit.val_score
        selected[row] = _select(hp, val, row)
        # The same for every method (NaN for a regression); see ProbeScore.
        hp[row][CHANCE], hp[row][TEST_MAJORITY] = fit.chance, fit.test_majority
    return ProbeResults(test, kfold if cfg.folds else {}, hp, alphas, points, val, selected, kfold_selected)


def _split_counts(data: ProbeData) -> dict[str, dict[str, int]]:
    out = {}
    for s in ("train", "val", "test"):
        rows = [i for i, x in enumerate(data.split) if x == s]
        out[s] = {"models": len({data.model_id[i] for i in rows}), "checkpoints": len(rows)}
    return out


def models_csv(data: ProbeData, run_split: dict[str, str]) -> str:
    """One line per probed model: its probe split, whether the run trained on it, the run's split of it."""
    rows: dict[str, list] = {}
    for mid, split, pre in zip(data.model_id, data.split, data.pretrained):
        rows.setdefault(mid, [split, pre, run_split.get(mid, ""), 0])[3] += 1
    lines = ["model_id,split,pretrained,run_split,checkpoints"]
    lines += [f"{mid},{s},{str(p).lower()},{r},{n}" for mid, (s, p, r, n) in sorted(rows.items())]
    return "\n".join(lines) + "\n"


FIGURES = ("Figures: `pred_vs_true.png` (test accuracy, test split), `layer_spread.png` "
           "(per-layer spread of SANE token embeddings, test models at their last epoch).\n")


def results_markdown(res: ProbeResults, data: ProbeData, zoo: Zoo, run_uri: str, split_how: str,
                     figures: str = FIGURES) -> str:
    counts = _split_counts(data)
    sizes = ", ".join(f"{s} {c['models']} models / {c['checkpoints']} checkpoints" for s, c in counts.items())
    epochs = sorted(set(data.epoch))
    n_models = len(set(data.model_id))
    n_pretrained = len({m for m, p in zip(data.model_id, data.pretrained) if p})
    parts = [
        "# Property prediction (linear probes)\n",
        f"Run `{run_uri}` embeds zoo `{zoo.uri}` ({zoo.format} layout): {sizes}; epochs "
        f"{epochs[0]}..{epochs[-1]} ({len(epochs)} per model). Split: {split_how}.\n",
        "## Test split (R²)\n",
        f"Test models seen in pretraining: **{data.test_models_pretrained()}** of {counts['test']['models']} "
        "(`models.csv` lists every model's split and whether the run trained on it). Ridge regression on "
        "standardized features, alpha picked on the validation split from 1e3..1e-5; R² on the test models.\n",
        report.table_markdown(res.test, "R²"),
    ]
    if res.val:
        picks = "; ".join(f"{row}: {res.selected[row]}" for row in TARGETS)
        parts += ["## Selection on the validation split (R²)\n",
                  f"The validation R² (at the alpha chosen there) of every column. `{SELECTED}` is, per target, "
                  f"the SANE embedding ({', '.join(m for m in VARIANTS)}) with the best validation R²; its "
                  f"test R² is the one above. Chosen: {picks}.\n",
                  report.table_markdown({row: res.val[row] for row in TARGETS}, "R² (val)")]
    if res.kfold:
        parts += ["## Grouped k-fold (R², mean ± std over folds of models)\n",
                  "Every model is in one test fold once; the next fold picks alpha. The folds mix models SANE "
                  f"was pretrained on (self-supervised, {n_pretrained} of {n_models} models) with ones it was not, "
                  "so this estimate is not free of pretraining exposure; the test-split table above is. "
                  f"`{SELECTED}` is chosen in each fold on that fold's validation models (nested).\n",
                  report.table_markdown(res.kfold, "R²")]
        if res.kfold_selected:
            parts.append("Picks per fold: " + "; ".join(f"{row}: {', '.join(v)}" for row, v in res.kfold_selected.items())
                         + ".\n")
    if res.hparams:
        parts += ["## Hyperparameters (test split)\n",
                  "Classification accuracy (ridge classifier) for categories, R² for continuous values. "
                  f"`{CHANCE}`: the test accuracy of always answering the training split's most frequent class "
                  "(0.000 when no test model has that class); "
                  f"`{TEST_MAJORITY}`: the share of the test split's most frequent class, the best any constant "
                  "answer scores (both n/a for R² rows).\n",
                  report.table_markdown(res.hparams, "target")]
    if data.notes:
        parts += ["## Notes\n", "\n".join(f"- {n}" for n in data.notes) + "\n"]
    parts.append(figures)
    return "\n".join(parts)


def write_results(res: ProbeResults, data: ProbeData, zoo: Zoo, cfg: ProbeConfig, out: str, split_how: str,
                  run_split: dict[str, str]) -> None:
    """Every output file, each written atomically; ``results.md`` last."""
    storage.makedirs(out)
    files: dict[str, bytes] = {
        "probe_config.yaml": dump_config(cfg).encode(),
        "models.csv": models_csv(data, run_split).encode(),
        "results.csv": report.table_csv(res.test).encode(),
        "pred_vs_true.png": report.predicted_vs_true_png(res.points),
        "results.json": json.dumps({
            "zoo": zoo.uri, "format": zoo.format, "split": split_how, "counts": _split_counts(data),
            "test_models": sorted({m for m, s in zip(data.model_id, data.split) if s == "test"}),
            "test_models_pretrained": data.test_models_pretrained(),
            "fallback_stats": sorted(data.fallback),
            "test_r2": res.test, "val_r2": res.val, "alpha": res.alphas, "kfold_r2": res.kfold,
            "selected": res.selected, "kfold_selected": res.kfold_selected, "hyperparameters": res.hparams,
            "notes": data.notes,
        }, indent=1, default=float).encode(),
    }
    if res.kfold:
        files["results_kfold.csv"] = report.table_csv(res.kfold).encode()
    if res.hparams:
        files["hyperparameters.csv"] = report.table_csv(res.hparams).encode()
    if data.fallback:
        files["fallback_stats.json"] = json.dumps(
            {lid: st.to_dict() for lid, st in sorted(data.fallback.items())}, indent=1).encode()
    last = {}
    for i, (mid, e, s) in enumerate(zip(data.model_id, data.epoch, data.split)):
        if s == "test" and e >= data.epoch[last.get(mid, i)]:
            last[mid] = i
    spread = np.concatenate(data.spread, axis=0)
    rows = sorted(last.values())
    files["layer_spread.png"] = report.layer_spread_png(
        spread[rows], data.target("test_acc")[rows], layer_names=data.layer_names)
    for name, blob in files.items():
        storage.write_bytes_atomic(storage.join(out, name), blob)
    storage.write_bytes_atomic(storage.join(out, "results.md"), results_markdown(res, data, zoo, cfg.run, split_how).encode())


def _probe_mixed(by_arch: dict[str, ProbeData], cfg: ProbeConfig, zoo: Zoo, out: str, split_how: str,
                 run_split: dict[str, str]) -> ProbeResults:
    """A zoo of several architectures (:mod:`sane_ray.probe.mixed`): each architecture probed and written
    on its own under ``arch/<name>/``, then the pooled SANE probe and the summary at ``out``."""
    per, skipped = {}, {}
    for label, data in by_arch.items():
        if missing := mixed.missing_splits(data):
            skipped[label] = missing
            continue
        log.info("probe: architecture %s (%d checkpoints)", label, len(data.epoch))
        per[label] = probe(data, cfg)
        write_results(per[label], data, zoo, cfg, storage.join(out, "arch", mixed.dir_name(label)), split_how,
                      run_split)
    pool = mixed.pooled(by_arch)
    log.info("probe: pooled over %d architectures (%d checkpoints)", len(by_arch), len(pool.epoch))
    res = probe(pool, cfg)
    table = mixed.summary_table(per, pool, res, by_arch)
    storage.makedirs(out)
    for name, blob in {
        "probe_config.yaml": dump_config(cfg).encode(),
        "models.csv": models_csv(pool, run_split).encode(),
        "results.csv": report.table_csv(res.test).encode(),
        "architectures.csv": report.table_csv(table, "architecture").encode(),
        "pred_vs_true.png": report.predicted_vs_true_png(res.points),
        "embedding_map.png": mixed.embedding_map(pool),
        "results.json": json.dumps({
            "zoo": zoo.uri, "format": zoo.format, "split": split_how, "counts": _split_counts(pool),
            "architectures": table, "skipped_architectures": skipped, "test_r2": res.test, "val_r2": res.val,
            "kfold_r2": res.kfold, "selected": res.selected, "hyperparameters": res.hparams, "notes": pool.notes,
        }, indent=1, default=float).encode(),
        **({"results_kfold.csv": report.table_csv(res.kfold).encode()} if res.kfold else {}),
    }.items():
        storage.write_bytes_atomic(storage.join(out, name), blob)
    pooled_md = results_markdown(res, pool, zoo, cfg.run, split_how, figures="Figures: `pred_vs_true.png` (test "
                                 "accuracy, test split, pooled), `embedding_map.png`.\n")
    storage.write_bytes_atomic(storage.join(out, "results.md"),
                               mixed.markdown(pooled_md, table, skipped, by_arch).encode())
    return res


def run_probe(cfg: ProbeConfig) -> tuple[str, ProbeResults]:
    """The whole job; returns the output URI and the results."""
    if not cfg.run:
        raise ValueError("probe: set run (the directory of an exported pretraining run)")
    out = storage.parse_uri(cfg.out).uri if cfg.out else storage.join(cfg.run, "probe")
    with lease.acquire(out, "probe"):  # before the run or the zoo is read
        return out, _probe(cfg, out)


def _probe(cfg: ProbeConfig, out: str) -> ProbeResults:
    """The job inside its lease on ``out``."""
    run = load_run(cfg.run, device=cfg.device or None)
    run_doc = _run_document(cfg.run)
    zoo_uri = cfg.zoo or (run.canonical.zoo_uri if run.canonical is not None else "")
    if not zoo_uri:
        raise ValueError(f"probe: run {cfg.run} records no zoo; set zoo")
    zoo = open_zoo(zoo_uri)
    control = untrained_control(run, int((run_doc.get("train") or {}).get("seed", 0))) if cfg.control else None
    log.info("probe: embedding %d models of %s with run %s", len(zoo.models), zoo.uri, cfg.run)
    by_arch = collect(run, control, zoo, cfg)
    probed = {m for d in by_arch.values() for m in d.model_id}
    split_of, split_how, seen = model_splits(run, [m for m in zoo.models if m.model_id in probed])
    known = run.splits()
    run_split = {m: known[m] for m in seen}  # the run's split of the probed models that are its own
    for data in by_arch.values():
        data.assign_splits(split_of, {m for m, s in run_split.items() if s == "train"})
    if len(by_arch) > 1:
        return _probe_mixed(by_arch, cfg, zoo, out, split_how, run_split)
    (data,) = by_arch.values()
    res = probe(data, cfg)
    write_results(res, data, zoo, cfg, out, split_how, run_split)
    return res
