"""The probe of a zoo that mixes architectures: a pooled table, one per architecture, and a map.

W and s(W) have one column per weight (or per layer statistic) of one layout, so they
exist only within an architecture; SANE's embedding (a mean over token latents) has the
same width for every architecture, so one probe can be fitted across all of them. The
report therefore has a pooled table with the SANE columns only, one full table per
architecture (W, s(W) and SANE side by side, fitted on that architecture's models alone,
written under ``arch/<name>/`` by the single-architecture writer), a summary of test
accuracy R² per architecture that also scores the pooled probe on each architecture's
test models, and ``embedding_map.png``: the first two principal components of the SANE
embeddings, coloured by architecture and by test accuracy.
"""

from __future__ import annotations

import math
import re

import numpy as np
from sklearn.metrics import r2_score

from sane_ray.data.splits import SPLITS
from sane_ray.probe import report
from sane_ray.probe.data import CONTROL, MEAN_STD, SANE, SELECTED, ProbeData, ProbeResults

COMMON = (SANE, MEAN_STD, CONTROL)  # feature sets of the same width for every architecture
POOLED = "SANE, pooled probe"  # the summary's column: the pooled probe scored on one architecture's test models


def pooled(by_arch: dict[str, ProbeData]) -> ProbeData:
    """Every architecture's rows in one :class:`ProbeData` holding only the :data:`COMMON` features."""
    first = next(iter(by_arch.values()))
    out = ProbeData(fallback=first.fallback, metrics={k: [] for k in first.metrics})
    for label, d in by_arch.items():
        for name in ("model_id", "epoch", "split", "pretrained", "arch", "hparams"):
            getattr(out, name).extend(getattr(d, name))
        for k in out.metrics:
            out.metrics[k].extend(d.metrics[k])
        out.notes += [f"{label}: {n}" for n in d.notes]
    for method in COMMON:
        if all(method in d.features for d in by_arch.values()):
            out.features[method] = [x for d in by_arch.values() for x in d.features[method]]
    return out


def missing_splits(data: ProbeData) -> list[str]:
    """The splits without any row (an architecture's probe needs all three)."""
    return [s for s in SPLITS if s not in data.split]


def dir_name(label: str) -> str:
    """A directory name for an architecture label (``mlp_digits [1a2b3c4d]`` -> ``mlp_digits_1a2b3c4d``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def per_architecture_r2(pool: ProbeData, res: ProbeResults, method: str = SANE) -> dict[str, float]:
    """The pooled probe's test-accuracy R² on each architecture's test models (NaN under two of them)."""
    y = pool.target("test_acc")
    test = np.isfinite(y) & (np.asarray(pool.split) == "test")
    arch = np.asarray(pool.arch)[test]
    true, pred, _ = res.points[method]
    out = {}
    for label in dict.fromkeys(pool.arch):
        m = arch == label
        out[label] = float(r2_score(true[m], pred[m])) if m.sum() > 1 else math.nan
    return out


def summary_table(per: dict[str, ProbeResults], pool: ProbeData, pooled_res: ProbeResults,
                  by_arch: dict[str, ProbeData]) -> dict[str, dict[str, float]]:
    """Test accuracy R² per architecture: its own W, s(W) and SANE probes, and the pooled probe."""
    on_arch = per_architecture_r2(pool, pooled_res)
    table = {}
    for label, d in by_arch.items():
        row: dict[str, float] = {}
        acc = per[label].test["Acc"] if label in per else {}
        for method in ("W", "s(W)", SANE, SELECTED):
            row[method] = acc.get(method, math.nan)
        row[POOLED] = on_arch.get(label, math.nan)
        table[label] = row
    return table


def embedding_map(pool: ProbeData) -> bytes:
    """``embedding_map.png``: the SANE embeddings of every checkpoint on their first two principal components."""
    x = pool.matrix(SANE).astype(np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return report.embedding_map_png(x @ vt[:2].T, np.asarray(pool.arch), pool.target("test_acc"))


def markdown(pooled_md: str, table: dict[str, dict[str, float]], skipped: dict[str, list[str]],
             by_arch: dict[str, ProbeData]) -> str:
    """The mixed report: the per-architecture summary first, then the pooled probe's own report."""
    tests = ", ".join(f"{a} {len({m for m, s in zip(d.model_id, d.split) if s == 'test'})}" for a, d in by_arch.items())
    parts = [
        "# Property prediction across architectures\n",
        f"The zoo mixes {len(table)} architectures. Per architecture, test accuracy R² of probes fitted on that "
        "architecture alone (W, s(W), SANE; full tables in `arch/<name>/results.md`), and of the pooled SANE "
        f"probe, fitted on every architecture at once, scored on that architecture's test models (`{POOLED}`). "
        "W and s(W) have no common layout across architectures, so the pooled tables below have SANE columns "
        "only. `embedding_map.png`: the SANE embeddings on their first two principal components.\n",
        report.table_markdown(table, "architecture"),
        f"Test models per architecture: {tests}.\n",
    ]
    if skipped:
        parts.append("No per-architecture probe for " + "; ".join(
            f"{a} (no {'/'.join(s)} models)" for a, s in skipped.items()) + ".\n")
    parts.append(pooled_md.replace("# Property prediction (linear probes)", "# Pooled probe (every architecture)", 1))
    return "\n".join(parts)
