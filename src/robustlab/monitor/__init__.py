"""After deployment: poisoning test cases and backdoor scans of training data."""

from .poison import PoisonConfig, Poisoned, poison_splits, stamp, write_poisoned
from .scan import ScanConfig, ScanResult, scan

__all__ = [
    "PoisonConfig",
    "Poisoned",
    "ScanConfig",
    "ScanResult",
    "poison_splits",
    "scan",
    "stamp",
    "write_poisoned",
]
