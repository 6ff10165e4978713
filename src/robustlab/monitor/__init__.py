"""After deployment: drift monitoring of incoming batches (and, from the other parts of
issue 18, adversarial-input detectors and poisoning scans)."""

from .drift import BUILTIN, DriftConfig, DriftMonitor, InputScore, drift_summary
from .drift_data import held_out_windows
from .shifts import Shift, parse_shift, stream_batches

__all__ = [
    "BUILTIN",
    "DriftConfig",
    "DriftMonitor",
    "InputScore",
    "Shift",
    "drift_summary",
    "held_out_windows",
    "parse_shift",
    "stream_batches",
]
