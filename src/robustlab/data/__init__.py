"""Data sources for robustlab: load_data(spec) -> DataSplits of float32 NCHW images in [0, 1]."""

from .dataset import Dataset, DataSplits, cache_dir
from .datasets import ACCEPTED_SPECS, load_data

__all__ = ["ACCEPTED_SPECS", "DataSplits", "Dataset", "cache_dir", "load_data"]
