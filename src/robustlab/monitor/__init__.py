"""After deployment: adversarial-input detectors (issue 18)."""

from .detectors import DETECTORS, layer_features
from .detectors_suite import DetectorSuite, fit_suite

__all__ = ["DETECTORS", "DetectorSuite", "fit_suite", "layer_features"]
