"""Model embeddings from a pretrained run (the paper's Algorithm 2).

- :func:`load_run` (``run.py``): the exported model and the run's preprocessing, once.
- :func:`preprocess` (``preprocess.py``): raw checkpoints -> tokens, mask, positions exactly
  as the run trained on them (aligned, standardized, tokenized).
- :func:`embed_tokens` / :func:`embed_checkpoints` / ``concat_tokens`` (``encode.py``): haloed encoding ->
  mean embedding, per-layer spread, optionally the token latents.
- :func:`embed_zoo` / :func:`embed_models` (``zoo.py``): per-checkpoint rows over a zoo, with
  a Ray Data actor pool or in process; :func:`read_embeddings` reads a written result and
  :func:`embedding_matrix` turns its ``embedding`` / ``layer_spread`` column into an array.
"""

from sane_ray.embed.encode import (
    Embeddings,
    decode_haloed,
    embed_checkpoints,
    embed_tokens,
    encode_haloed,
    halo_plan,
)
from sane_ray.embed.preprocess import Preprocessing, preprocess
from sane_ray.embed.run import Run, load_run
from sane_ray.embed.zoo import (
    EmbedConfig,
    embed_models,
    embed_zoo,
    embedding_matrix,
    read_embeddings,
)

__all__ = [
    "EmbedConfig",
    "Embeddings",
    "Preprocessing",
    "Run",
    "decode_haloed",
    "embed_checkpoints",
    "embed_models",
    "embed_tokens",
    "embed_zoo",
    "embedding_matrix",
    "encode_haloed",
    "halo_plan",
    "load_run",
    "preprocess",
    "read_embeddings",
]
