"""After deployment: drift monitoring of incoming batches, poisoning test cases and
backdoor scans of training data."""

from .drift import BUILTIN, DriftConfig, DriftMonitor, InputScore, drift_summary
from .drift_data import held_out_windows
from .poison import PoisonConfig, Poisoned, poison_splits, stamp, write_poisoned
from .scan import ScanConfig, ScanResult, scan
from .shifts import Shift, parse_shift, stream_batches

__all__ = [
    "BUILTIN",
    "DriftConfig",
    "DriftMonitor",
    "InputScore",
    "PoisonConfig",
    "Poisoned",
    "ScanConfig",
    "ScanResult",
    "Shift",
    "drift_summary",
    "held_out_windows",
    "parse_shift",
    "poison_splits",
    "scan",
    "stamp",
    "stream_batches",
    "write_poisoned",
]
