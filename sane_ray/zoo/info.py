"""A zoo at a glance: counts, epochs, architectures, final accuracy and what was skipped.

:func:`zoo_info` returns plain JSON-serializable data (for ``sane-ray zoo info --json``);
:func:`format_info` renders it for people.
"""

from __future__ import annotations

import math
from collections import Counter
from statistics import median
from typing import Any

from sane_ray.zoo.spec import Zoo


def zoo_info(zoo: Zoo) -> dict[str, Any]:
    """Summary of a zoo description; accuracy is the final-epoch ``test_acc`` per model (NaN ignored)."""
    epochs = [c.epoch for m in zoo.models for c in m.checkpoints]
    per_model = [len(m.checkpoints) for m in zoo.models]
    final_acc = [m.last.metrics.get("test_acc", math.nan) for m in zoo.models]
    final_acc = [a for a in final_acc if not math.isnan(a)]
    return {
        "format": zoo.format,
        "uri": zoo.uri,
        "models": len(zoo.models),
        "checkpoints": zoo.num_checkpoints,
        "checkpoints_per_model": {"min": min(per_model), "max": max(per_model)} if per_model else None,
        "epochs": {"min": min(epochs), "max": max(epochs)} if epochs else None,
        "architectures": dict(sorted(Counter(m.architecture for m in zoo.models).items())),
        "accuracy": {
            "min": min(final_acc), "median": median(final_acc), "max": max(final_acc), "models": len(final_acc),
        } if final_acc else None,
        "skipped": [{"path": s.path, "reason": s.reason} for s in zoo.skipped],
        "metadata": zoo.metadata,
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`zoo_info`'s result."""
    lines = [
        f"zoo:          {info['uri']} ({info['format']} layout)",
        f"models:       {info['models']}",
        f"checkpoints:  {info['checkpoints']}",
    ]
    task = (info["metadata"].get("generation") or {}).get("task")  # zoos that make-zoo wrote record it
    if task:
        lines.insert(1, f"task:         {task}")
    if info["checkpoints_per_model"]:
        per = info["checkpoints_per_model"]
        lines[-1] += f" ({per['min']}-{per['max']} per model)" if per["min"] != per["max"] else f" ({per['min']} per model)"
    if info["epochs"]:
        lines.append(f"epochs:       {info['epochs']['min']}-{info['epochs']['max']}")
    if info["architectures"]:
        archs = ", ".join(f"{name} x{n}" for name, n in info["architectures"].items())
        lines.append(f"architectures: {archs}")
    acc = info["accuracy"]
    if acc:
        lines.append(f"final test_acc: min {acc['min']:.4f}  median {acc['median']:.4f}  max {acc['max']:.4f}"
                     f"  ({acc['models']} models)")
    else:
        lines.append("final test_acc: not recorded")
    lines.append(f"skipped:      {len(info['skipped'])}")
    lines += [f"  {s['path']}: {s['reason']}" for s in info["skipped"]]
    if "unlisted" in info:  # zoo info --check
        lines.append(f"unlisted:     {len(info['unlisted'])} file(s) under the zoo that its manifest does not name")
        lines += [f"  {path}" for path in info["unlisted"]]
    return "\n".join(lines)
