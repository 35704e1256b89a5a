"""The SANE autoencoder and its losses (no Ray, no torch.distributed)."""

from sane_ray.model.attention import select_attention_backend
from sane_ray.model.config import MODEL_PRESETS, SaneConfig, preset, reference, resnet, small_cnn, tiny
from sane_ray.model.layers import PositionOutOfRangeError
from sane_ray.model.losses import LossParts, masked_mse, nt_xent, sane_loss
from sane_ray.model.sane import SaneModel, SaneOutput, configure_optimizer

__all__ = [
    "MODEL_PRESETS",
    "LossParts",
    "PositionOutOfRangeError",
    "SaneConfig",
    "SaneModel",
    "SaneOutput",
    "configure_optimizer",
    "masked_mse",
    "nt_xent",
    "preset",
    "reference",
    "resnet",
    "sane_loss",
    "select_attention_backend",
    "small_cnn",
    "tiny",
]
