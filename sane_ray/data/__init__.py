"""Windows and the Ray Data pipeline: zoo -> canonical tokenized zoo -> streams of window pairs."""

from sane_ray.data.format import CanonicalZoo, DataPreparationError, LayoutGroup
from sane_ray.data.config import DataConfig
from sane_ray.data.pipeline import PreparedData, prepare_data
from sane_ray.data.splits import SplitError, split_models
from sane_ray.data.windows import WindowSizeError

__all__ = [
    "CanonicalZoo",
    "DataConfig",
    "DataPreparationError",
    "LayoutGroup",
    "PreparedData",
    "SplitError",
    "WindowSizeError",
    "prepare_data",
    "split_models",
]
