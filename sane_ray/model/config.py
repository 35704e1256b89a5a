"""The SANE autoencoder's settings and named presets.

A config is a plain dataclass with defaults (it loads from YAML/TOML through
``sane_ray.config.load_config``). The defaults equal the ``reference`` preset. Presets
are plain functions returning a config, so a caller can start from one and override
fields with ``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# How the reconstruction MSE is averaged: over the real entries, over all entries (padding
# included, the reference implementation's choice), or per token (sane_ray.model.losses).
RECONSTRUCTION_NORMS = ("real", "all", "token")
# What each view is reconstructed towards: its clean tokens, or its noisy input (the reference).
RECONSTRUCTION_TARGETS = ("clean", "noisy")


@dataclass
class SaneConfig:
    """Architecture and loss settings of one SANE model.

    ``d_t`` (token size) and ``window_size`` are facts of the data: 0 means "not yet
    known", and the pretraining job fills them in from its data config (a different
    non-zero value is refused there). A model can only be built with ``d_t`` set.
    """

    d_t: int = 289
    """Token size; 0: from the data (data.token_size)."""
    window_size: int = 32
    """The window a preset was designed for (the model itself takes any); 0: from the data (data.window_size).
    In an exported run, the training window's one record (embedding and sampling read it here)."""
    d_model: int = 256
    """Transformer width of encoder and decoder."""
    d_z: int = 64
    """Latent size per token: the embedding's width."""
    n_layers: int = 4
    """Transformer blocks in the encoder, and as many in the decoder."""
    n_heads: int = 4
    """Attention heads per block (d_model must divide by it)."""
    dropout: float = 0.0
    """Dropout rate on the embedded input and in every transformer block."""
    max_positions: tuple[int, int, int] = (4096, 256, 2048)
    """Sizes of the learned position tables for the token coordinates (n, l, k): global token index,
    layer index, row index. They must exceed the largest coordinate of every zoo the model sees, also
    at sampling time; larger is headroom, smaller is refused before training starts."""
    projection_dim: int = 32
    """Output size of the projection head the contrastive loss compares windows with."""
    gamma: float = 0.05
    """Loss weight: gamma * NT-Xent + (1 - gamma) * reconstruction MSE."""
    temperature: float = 0.1
    """NT-Xent temperature."""
    noise_sigma: float = 0.1
    """Multiplicative input noise: each view's tokens are x * (1 + sigma * N(0, 1))."""
    reconstruction_norm: str = "real"
    """MSE averaged over the real entries (real), all entries, padding included (all, the reference's), or
    per token: each token's mean over its real entries, averaged over tokens (token, for mixed zoos)."""
    reconstruction_target: str = "clean"
    """Each view is reconstructed towards its clean tokens (clean) or its noisy input (noisy, the reference's)."""

    def __post_init__(self) -> None:
        self.max_positions = tuple(int(v) for v in self.max_positions)  # type: ignore[assignment]
        for name in ("d_t", "window_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"SaneConfig.{name} must be positive (or 0: from the data), got {getattr(self, name)}")
        for name in ("d_model", "d_z", "n_layers", "n_heads", "projection_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SaneConfig.{name} must be positive, got {getattr(self, name)}")
        if len(self.max_positions) != 3 or min(self.max_positions) <= 0:
            raise ValueError(f"SaneConfig.max_positions must be three positive sizes (n, l, k), got {self.max_positions}")
        if self.d_model % self.n_heads:
            raise ValueError(f"SaneConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"SaneConfig.d_model={self.d_model} must be even (the position embedding splits it in halves)")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"SaneConfig.gamma must be in [0, 1], got {self.gamma}")
        if self.temperature <= 0:
            raise ValueError(f"SaneConfig.temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SaneConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.noise_sigma < 0:
            raise ValueError(f"SaneConfig.noise_sigma must be >= 0, got {self.noise_sigma}")
        if self.reconstruction_norm not in RECONSTRUCTION_NORMS:
            raise ValueError(f"SaneConfig.reconstruction_norm must be one of {', '.join(RECONSTRUCTION_NORMS)}, "
                             f"got {self.reconstruction_norm!r}")
        if self.reconstruction_target not in RECONSTRUCTION_TARGETS:
            raise ValueError(f"SaneConfig.reconstruction_target must be one of {', '.join(RECONSTRUCTION_TARGETS)}, "
                             f"got {self.reconstruction_target!r}")


def tiny() -> SaneConfig:
    """A CPU-sized model for tests and the digits zoos (a few seconds per epoch)."""
    return SaneConfig(
        d_t=32, window_size=16, d_model=64, d_z=16, n_layers=2, n_heads=2,
        max_positions=(1024, 64, 256), projection_dim=16,
    )


def reference() -> SaneConfig:
    """The configuration of the throughput target (d_model 256, 4 layers, window 32)."""
    return SaneConfig()


def small_cnn() -> SaneConfig:
    """Paper table 8, small CNN zoos (~50 tokens per model at token size 289)."""
    return SaneConfig(
        d_t=289, window_size=32, d_model=1024, d_z=128, n_layers=4, n_heads=8,
        max_positions=(1024, 64, 512), projection_dim=64,
    )


def resnet() -> SaneConfig:
    """Paper table 8, ResNet-18 zoos (~39k tokens without BN, ~54k with BN)."""
    return SaneConfig(
        d_t=288, window_size=256, d_model=2048, d_z=128, n_layers=8, n_heads=8,
        max_positions=(65536, 128, 1024), projection_dim=64,
    )


MODEL_PRESETS: dict[str, Callable[[], SaneConfig]] = {
    "tiny": tiny,
    "reference": reference,
    "small_cnn": small_cnn,
    "resnet": resnet,
}


def preset(name: str) -> SaneConfig:
    """The named preset's config; unknown names list the known ones."""
    try:
        return MODEL_PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown SANE preset {name!r}; known: {', '.join(MODEL_PRESETS)}") from None
