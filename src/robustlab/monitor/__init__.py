"""After deployment: adversarial-input detectors, drift monitoring of incoming batches,
poisoning test cases and backdoor scans of training data."""

from .detectors import DETECTORS, layer_features
from .detectors_eval import evaluate_detectors
from .detectors_suite import DetectorSuite, fit_suite
from .drift import BUILTIN, DriftConfig, DriftMonitor, InputScore, drift_summary
from .drift_data import held_out_windows
from .poison import PoisonConfig, Poisoned, poison_splits, stamp, write_poisoned
from .scan import ScanConfig, ScanResult, scan
from .shifts import Shift, parse_shift, stream_batches

__all__ = [
    "BUILTIN",
    "DETECTORS",
    "DetectorSuite",
    "DriftConfig",
    "DriftMonitor",
    "InputScore",
    "PoisonConfig",
    "Poisoned",
    "ScanConfig",
    "ScanResult",
    "Shift",
    "drift_summary",
    "evaluate_detectors",
    "fit_suite",
    "held_out_windows",
    "layer_features",
    "parse_shift",
    "poison_splits",
    "scan",
    "stamp",
    "stream_batches",
    "write_poisoned",
]
