"""Model embeddings from a pretrained run (the paper's Algorithm 2).

- :func:`load_run` (``run.py``): the exported model and the run's preprocessing, once.
- :func:`preprocess` (``preprocess.py``): raw checkpoints -> tokens, mask, positions exactly
  as the run trained on them (aligned, standardized, tokenized).
- :func:`embed_tokens` / :func:`embed_checkpoints` (``encode.py``): haloed encoding ->
  mean embedding, per-layer spread, optionally the token latents.
- :func:`embed_zoo` / :func:`embed_models` (``zoo.py``): per-checkpoint rows over a zoo, with
  a Ray Data actor pool or in process; :func:`read_embeddings` reads a written result.
"""

from sane_ray.embed.encode import Embeddings, embed_checkpoints, embed_tokens, halo_plan
from sane_ray.embed.preprocess import Preprocessing, preprocess
from sane_ray.embed.run import Run, load_run

__all__ = [
    "Embeddings",
    "Preprocessing",
    "Run",
    "embed_checkpoints",
    "embed_tokens",
    "halo_plan",
    "load_run",
    "preprocess",
]
