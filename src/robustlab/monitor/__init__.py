"""After deployment: adversarial-input detectors (issue 18)."""

from .detectors import DETECTORS, layer_features
from .detectors_eval import evaluate_detectors
from .detectors_suite import DetectorSuite, fit_suite

__all__ = ["DETECTORS", "DetectorSuite", "evaluate_detectors", "fit_suite", "layer_features"]
