"""Preprocess any checkpoint exactly as a run's training data was: align, tokenize, standardize.

Pretraining exports next to the model everything this needs (:func:`run_export_files`),
so a run embeds models without its zoo or canonical cache:

- ``preprocessing.json``: token size, ``include_bn``, the padding position, the alignment
  settings, and per token layout (one per distinct architecture
  shape of the zoo) its layout JSON, architecture and arguments, the alignment
  reference's (model id, epoch) and its standardization statistics;
- ``reference-<layout id>.safetensors``: the reference checkpoint's raw weights;
- ``canonical.json``: the run's canonical-zoo manifest (its zoo URI and split of model ids).

:func:`preprocess` then applies the canonicalization of :mod:`sane_ray.data.canonical`
to new weights with the same functions, so a zoo model comes out bit-identical to the
tokens the run trained on. An architecture the run never saw is tokenized on its own
layout; its layers take the run's statistics where a run layout has a layer of the same
key and shape, the others statistics of the models being embedded (logged once); it is
not aligned (the run has no reference of it).

:func:`model_tokens` is the one way to preprocess checkpoints of a zoo model (probe, zoo
embedding, sampling prompts and novelty all call it): it aligns them with the permutation
found on the model's *anchor*, its last usable checkpoint among the epochs the run trained
on (the canonical build's rule), so a checkpoint's tokens are the same whether it is
passed alone or with any other epochs of its model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sane_ray import storage
from sane_ray.data.format import CANONICAL_MANIFEST, CanonicalZoo, architecture_layout
from sane_ray.data.config import epoch_filter
from sane_ray.model.export import CONFIG_FILE, tensors_from_bytes, tensors_to_bytes
from sane_ray.weights.align import align_model
from sane_ray.weights.permutation import permutation_spec
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import (
    BnMode,
    TokenLayout,
    Tokens,
    bn_mode,
    tokenize_stack,
)
from sane_ray.zoo.checks import DEFAULT_MAX_ABS, BadCheckpointError, skip
from sane_ray.zoo.reader import load_checkpoint, load_model_checkpoints
from sane_ray.zoo.spec import CheckpointRecord, ModelRecord, Skipped

if TYPE_CHECKING:
    from sane_ray.data.pipeline import PreparedData

log = logging.getLogger(__name__)

PREPROCESSING_FILE = "preprocessing.json"
PREPROCESSING_FORMAT = "sane-ray/preprocessing"
PREPROCESSING_VERSION = 3
# Versions read back: 1 also recorded the training window, 1 and 2 the token size; ``sane_config.json``
# owns both (the model's ``window_size`` and ``d_t``), and old copies are read only when it is absent.
PREPROCESSING_READABLE = (1, 2, 3)


def reference_file(layout_id: str) -> str:
    return f"reference-{layout_id}.safetensors"


def _token_size(files: Mapping[str, bytes], doc: Mapping[str, Any], uri: str) -> int:
    """The run's token size: the model's input width ``d_t`` in ``sane_config.json``; a version 1-2
    document's own copy only where that file is not given."""
    if CONFIG_FILE in files:
        return int(json.loads(files[CONFIG_FILE])["d_t"])
    if "token_size" in doc:
        return int(doc["token_size"])
    raise ValueError(f"{storage.join(uri, CONFIG_FILE)}: missing (the run's token size, d_t)")


@dataclass(frozen=True)
class LayoutPrep:
    """One token layout of the run: its architecture, statistics and alignment reference."""

    layout_id: str
    layout: TokenLayout
    architecture: str
    arch_kwargs: dict[str, Any]
    reference: tuple[str, int]  # (model id, epoch) of the alignment reference
    stats: StandardizationStats


@dataclass
class Preprocessing:
    """How a run turned checkpoints into tokens (see the module doc); ``references`` hold raw weights."""

    token_size: int
    include_bn: BnMode
    pad_position: tuple[int, int, int]
    align: bool
    align_max_sweeps: int
    align_seed: int
    layouts: dict[str, LayoutPrep]
    references: dict[str, dict[str, torch.Tensor]]

    @classmethod
    def from_canonical(
        cls,
        canonical: CanonicalZoo,
        stats: Mapping[str, StandardizationStats],
        s3: storage.S3Options | None = None,
    ) -> Preprocessing:
        """The preprocessing of a canonical zoo (loads each layout's reference checkpoint from the zoo)."""
        from sane_ray.zoo.reader import open_zoo

        s = canonical.settings
        zoo = open_zoo(canonical.zoo_uri, s3=s3)
        layouts, references = {}, {}
        for lid, g in sorted(canonical.groups.items()):
            mid, epoch = g.reference
            model = zoo.model(mid)
            ckpt = next(c for c in model.checkpoints if c.epoch == epoch)
            references[lid] = load_checkpoint(model, ckpt, s3=s3, max_abs=s["max_abs_weight"])
            layouts[lid] = LayoutPrep(lid, g.layout, g.architecture, json.loads(g.arch_kwargs_json), (mid, epoch), stats[lid])
        return cls(
            token_size=s["token_size"], include_bn=s["include_bn"],
            pad_position=canonical.pad_position(),
            align=s["align"], align_max_sweeps=s["align_max_sweeps"], align_seed=s["align_seed"],
            layouts=layouts, references=references,
        )

    def files(self) -> dict[str, bytes]:
        """The export files (name -> bytes) that :meth:`from_files` reads back."""
        doc = {
            "format": PREPROCESSING_FORMAT, "version": PREPROCESSING_VERSION,
            "include_bn": self.include_bn,
            "pad_position": list(self.pad_position), "align": self.align,
            "align_max_sweeps": self.align_max_sweeps, "align_seed": self.align_seed,
            "layouts": {
                lid: {"layout": p.layout.to_dict(), "architecture": p.architecture, "arch_kwargs": p.arch_kwargs,
                      "reference": list(p.reference), "stats": p.stats.to_dict()}
                for lid, p in self.layouts.items()
            },
        }
        out = {PREPROCESSING_FILE: json.dumps(doc, indent=1).encode()}
        out.update({reference_file(lid): tensors_to_bytes(sd) for lid, sd in self.references.items()})
        return out

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], uri: str) -> Preprocessing:
        """Read :meth:`files` back, the token size from the model's ``sane_config.json`` (``d_t``);
        errors name the file under ``uri``."""
        where = storage.join(uri, PREPROCESSING_FILE)
        if PREPROCESSING_FILE not in files:
            raise ValueError(f"{where}: missing; this export was not written by pretraining (no preprocessing)")
        try:
            doc = json.loads(files[PREPROCESSING_FILE])
            if doc.get("format") != PREPROCESSING_FORMAT or doc.get("version") not in PREPROCESSING_READABLE:
                raise ValueError(f"not a {PREPROCESSING_FORMAT} version {PREPROCESSING_VERSION} document")
            layouts = {
                lid: LayoutPrep(lid, TokenLayout.from_dict(d["layout"]), d["architecture"], d["arch_kwargs"],
                                (d["reference"][0], int(d["reference"][1])), StandardizationStats.from_dict(d["stats"]))
                for lid, d in doc["layouts"].items()
            }
            prep = dict(
                token_size=_token_size(files, doc, uri), include_bn=bn_mode(doc["include_bn"]),
                pad_position=tuple(int(v) for v in doc["pad_position"]),
                align=bool(doc["align"]), align_max_sweeps=int(doc["align_max_sweeps"]),
                align_seed=int(doc["align_seed"]),
            )
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{where}: unreadable preprocessing ({e})") from e
        references = {}
        for lid in layouts:
            name = reference_file(lid)
            if name not in files:
                raise ValueError(f"{storage.join(uri, name)}: missing (the reference weights of layout {lid})")
            references[lid] = tensors_from_bytes(files[name], storage.join(uri, name))
        return cls(layouts=layouts, references=references, **prep)  # type: ignore[arg-type]

    def layout_id(self, architecture: str, arch_kwargs: Mapping[str, Any] | None = None) -> str:
        """The layout id of an architecture under this run's token size (known to the run or not)."""
        return architecture_layout(architecture, dict(arch_kwargs or {}), self.token_size, self.include_bn)[0]


def run_export_files(prepared: PreparedData, s3: storage.S3Options | None = None) -> dict[str, bytes]:
    """What pretraining exports next to the model so the run embeds new models without its zoo:
    the preprocessing (:meth:`Preprocessing.files`) and the canonical manifest (the run's zoo
    URI and split of model ids)."""
    prep = Preprocessing.from_canonical(prepared.canonical, prepared.stats, s3)
    return {**prep.files(), CANONICAL_MANIFEST: prepared.canonical.to_json().encode()}


def _is_reference(sd: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> bool:
    """The reference itself is left unaligned, as in the canonical zoo (matching it to itself is a no-op
    up to ties)."""
    return sd.keys() == ref.keys() and all(torch.equal(sd[k].to(ref[k].dtype), ref[k]) for k in ref)


def _std_floor(prep: Preprocessing) -> float:
    return next(iter(prep.layouts.values())).stats.std_floor if prep.layouts else 1e-6


def own_stats(
    prep: Preprocessing, architecture: str, arch_kwargs: Mapping[str, Any] | None,
    models: Iterable[Sequence[Mapping[str, torch.Tensor]]],
) -> StandardizationStats | None:
    """Statistics of ``models`` (an iterable of checkpoint lists, streamed) for an architecture whose
    layout the run lacks; None when the run has its layout (its own statistics apply)."""
    if prep.layout_id(architecture, arch_kwargs) in prep.layouts:
        return None
    stats = StandardizationStats(prep.include_bn, _std_floor(prep))
    for checkpoints in models:
        for sd in checkpoints:
            stats.update(sd)
    return stats


def population_stats(
    run: Any, models: Iterable[ModelRecord], s3: storage.S3Options | None = None, max_abs: float = DEFAULT_MAX_ABS,
) -> dict[str, StandardizationStats]:
    """Per layout the run lacks (an architecture it never saw): statistics over every usable
    checkpoint of ``models`` of that layout, streamed one model at a time. They standardize the
    layers the run's statistics do not cover (:func:`stats_for_layout`); a job computes them once
    for the population it embeds and records them with its results. Empty when the run knows
    every layout of ``models`` (nothing is read then)."""
    prep: Preprocessing = getattr(run, "preprocessing", run)
    by_layout: dict[str, list[ModelRecord]] = {}
    for m in models:
        lid = prep.layout_id(m.architecture, m.arch_kwargs)
        if lid not in prep.layouts:
            by_layout.setdefault(lid, []).append(m)
    out = {}
    for lid, group in by_layout.items():
        loaded = ([sd for _, sd in load_model_checkpoints(m, s3=s3, max_abs=max_abs)[0]] for m in group)
        stats = own_stats(prep, group[0].architecture, group[0].arch_kwargs, loaded)
        if stats is not None:
            out[lid] = stats
    return out


def uncovered_layers(prep: Preprocessing, layout: TokenLayout) -> list[str]:
    """Layers of ``layout`` that no layout of the run holds with the same key and shape."""
    known = {(s.key, s.shape, s.bias_key) for p in prep.layouts.values() for s in p.layout.layers}
    return [s.key for s in layout.layers if (s.key, s.shape, s.bias_key) not in known]


_logged: set[tuple[str, str]] = set()


def stats_for_layout(
    prep: Preprocessing, layout: TokenLayout, own: StandardizationStats, what: str
) -> StandardizationStats:
    """Statistics for a layout the run does not hold: the run's for layers of matching key and shape,
    ``own`` (statistics of the models being embedded) for the rest, logged once per architecture and set of layers."""
    known = {}
    for p in prep.layouts.values():
        for s in p.layout.layers:
            known.setdefault((s.key, s.shape, s.bias_key), p.stats.layers[s.key])
    moments, uncovered = {}, []
    for s in layout.layers:
        hit = known.get((s.key, s.shape, s.bias_key))
        if hit is None:
            uncovered.append(s.key)
            moments[s.key] = own.layers[s.key]
        else:
            moments[s.key] = hit
    if uncovered and (what, ",".join(uncovered)) not in _logged:
        _logged.add((what, ",".join(uncovered)))
        log.warning("%s: the run's statistics do not cover layer(s) %s; standardizing them with statistics "
                    "of the models being embedded", what, ", ".join(uncovered))
    return StandardizationStats(prep.include_bn, own.std_floor, moments)


def preprocess(
    run: Any,
    checkpoints: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    architecture: str,
    arch_kwargs: Mapping[str, Any] | None = None,
    fallback_stats: StandardizationStats | None = None,
    anchor: Mapping[str, torch.Tensor] | None = None,
) -> Tokens:
    """Tokens, mask and positions of raw checkpoints exactly as ``run`` trained on them.

    ``run`` is a :class:`~sane_ray.embed.run.Run` (or its :class:`Preprocessing`).
    ``checkpoints`` is one state dict (tokens (N, d_t)) or the checkpoints of *one* model
    in epoch order (tokens (B, N, d_t)): like the run, they are all aligned with the
    permutation found on ``anchor`` (default: the last of them; zoo models go through
    :func:`model_tokens`, which passes the model's anchor). For an architecture the run
    does not know, ``fallback_stats`` (statistics of all the models being embedded, e.g.
    from :func:`own_stats`; default: of ``checkpoints`` alone) standardize uncovered layers.
    """
    prep: Preprocessing = getattr(run, "preprocessing", run)
    single = isinstance(checkpoints, Mapping)
    states = [checkpoints] if single else list(checkpoints)
    if not states:
        raise ValueError("preprocess got no checkpoints")
    kwargs = dict(arch_kwargs or {})
    lid = prep.layout_id(architecture, kwargs)
    known = prep.layouts.get(lid)
    anchor = states[-1] if anchor is None else anchor
    if known is not None and prep.align and not _is_reference(anchor, prep.references[lid]):
        spec = permutation_spec(architecture, **kwargs)
        states, _ = align_model(spec, prep.references[lid], states, prep.align_max_sweeps, prep.align_seed, anchor)
    toks = tokenize_stack(states, prep.token_size, prep.include_bn)
    if known is not None:
        stats = known.stats
    else:
        own = fallback_stats
        if own is None:
            own = StandardizationStats.from_models(states, prep.include_bn, _std_floor(prep))
        stats = stats_for_layout(prep, toks.layout, own, f"{architecture} {kwargs}")
    tokens = stats.apply_tokens(toks.tokens, toks.layout)
    if single:
        return Tokens(tokens[0], toks.mask, toks.pos, toks.layout, {k: v[0] for k, v in toks.bn_state.items()})
    return Tokens(tokens, toks.mask, toks.pos, toks.layout, toks.bn_state)


def run_settings(run: Any) -> dict[str, Any]:
    """The canonical settings (epochs, ``max_abs_weight``, ...) of a run or of its canonical manifest;
    {} for a run without a manifest or a bare :class:`Preprocessing`."""
    canonical = getattr(run, "canonical", run)
    return dict(canonical.settings) if isinstance(canonical, CanonicalZoo) else {}


def run_max_abs(run: Any) -> float:
    """The largest |weight| the run accepted (checkpoints above it are skipped as diverged): the one
    fallback for every reader of a run's zoo."""
    return float(run_settings(run).get("max_abs_weight", DEFAULT_MAX_ABS))


def run_epochs(run: Any) -> Callable[[int], bool]:
    """Which epochs the run trained on (:func:`~sane_ray.data.config.epoch_filter` of its recorded
    settings): what every reader of a run's zoo selects unless told otherwise."""
    return epoch_filter(run_settings(run))


def checkpoints_at(run: Any, model: ModelRecord, epochs: Iterable[int] | None = None) -> list[CheckpointRecord]:
    """The checkpoints of ``model`` at ``epochs`` (default: the epochs the run trained on), in its order."""
    uses = run_epochs(run) if epochs is None else epoch_filter({"epochs": list(epochs)})
    return [c for c in model.checkpoints if uses(c.epoch)]


@dataclass
class ModelTokens:
    """A zoo model's selected checkpoints, preprocessed as the run would (:func:`model_tokens`)."""

    model: ModelRecord
    good: list[tuple[CheckpointRecord, dict[str, torch.Tensor]]]  # usable, epoch order, raw weights
    skipped: list[Skipped] = field(default_factory=list)
    tokens: Tokens | None = None  # (B, N, d_t), one row per ``good``; None when nothing was usable


def anchor_checkpoint(
    run: Any, model: ModelRecord, loaded: Mapping[int, Mapping[str, torch.Tensor]], bad: set[int],
    s3: storage.S3Options | None, max_abs: float,
) -> Mapping[str, torch.Tensor] | None:
    """The checkpoint whose permutation aligns every checkpoint of ``model``: its last usable one
    among the epochs the run trained on (what the canonical build aligns on), else its last usable
    one at all. ``loaded``/``bad``: epochs already read (good / unusable), so nothing is read twice."""
    uses = run_epochs(run)
    newest_first = sorted(model.checkpoints, key=lambda c: (uses(c.epoch), c.epoch), reverse=True)
    for ckpt in newest_first:
        if ckpt.epoch in loaded:
            return loaded[ckpt.epoch]
        if ckpt.epoch in bad:
            continue
        try:
            return load_checkpoint(model, ckpt, s3=s3, max_abs=max_abs)
        except BadCheckpointError:
            bad.add(ckpt.epoch)
    return None


def model_tokens(
    run: Any, model: ModelRecord, epochs: Iterable[int] | None = None, *,
    s3: storage.S3Options | None = None, max_abs: float | None = None,
    fallback_stats: StandardizationStats | None = None,
) -> ModelTokens:
    """The usable checkpoints of ``model`` at ``epochs`` (default: the epochs the run trained on) and
    their tokens: the one preprocessing path for zoo models (see the module doc).

    ``max_abs`` defaults to the run's; ``fallback_stats`` are the population's statistics for
    layers the run's statistics do not cover (:func:`own_stats`), passed on to :func:`preprocess`.
    """
    max_abs = run_max_abs(run) if max_abs is None else max_abs
    chosen = checkpoints_at(run, model, epochs)
    good: list[tuple[CheckpointRecord, dict[str, torch.Tensor]]] = []
    skipped: list[Skipped] = []
    bad: set[int] = set()
    for ckpt in chosen:
        try:
            good.append((ckpt, load_checkpoint(model, ckpt, s3=s3, max_abs=max_abs)))
        except BadCheckpointError as e:
            skipped.append(skip(e.path, e.reason))
            bad.add(ckpt.epoch)
    if not good:
        return ModelTokens(model, good, skipped)
    anchor = anchor_checkpoint(run, model, {c.epoch: sd for c, sd in good}, bad, s3, max_abs)
    toks = preprocess(run, [sd for _, sd in good], model.architecture, model.arch_kwargs, fallback_stats, anchor)
    return ModelTokens(model, good, skipped, toks)
