"""Synthetic training windows in the batch format of docs/CONTRACTS.md.

For tests and benchmarks of the training stack without a model zoo: random tokens,
a second view that is a small perturbation of the first, padding in the last token
of every 8-token row run, and consistent ``(n, l, k)`` positions.
"""

from __future__ import annotations

import numpy as np
import ray.data

from sane_ray.model.config import SaneConfig


def synthetic_batch(ids: np.ndarray, cfg: SaneConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Windows for the given row ids; the same id always yields the same window."""
    ws, d_t = cfg.window_size, cfg.d_t
    x_i = np.stack([np.random.default_rng((seed, int(i))).standard_normal((ws, d_t), dtype=np.float32) for i in ids])
    n = (ids[:, None] % 16) + np.arange(ws)[None, :]  # consecutive token indices
    pos = np.stack([n, n // 8, n % 8], axis=-1).astype(np.int64)
    pos = np.minimum(pos, np.asarray(cfg.max_positions) - 1)
    mask = np.ones((len(ids), ws, d_t), dtype=bool)
    mask[:, :, d_t // 2:] &= (pos[..., 2:3] != 7)  # the last row chunk of each layer is half padding
    x_i = np.where(mask, x_i, np.float32(0))
    return {"x_i": x_i, "x_j": x_i * np.float32(1.05), "mask": mask, "pos": pos}


def synthetic_dataset(num_windows: int, cfg: SaneConfig, seed: int = 0, num_blocks: int = 4) -> ray.data.Dataset:
    """A Ray Dataset of ``num_windows`` synthetic windows, built in the driver (no tasks)."""
    batch = synthetic_batch(np.arange(num_windows), cfg, seed)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(num_windows)]
    return ray.data.from_items(rows, override_num_blocks=num_blocks)
