"""Post-hoc detectors. Every module in this package is imported here, so defining a subclass with a
`name` is all it takes to register a detector (no hand-kept list)."""

import importlib
import pkgutil

from ood.detectors.base import (
    Detector,
    DetectorNotApplicable,
    available_detectors,
    build_detector,
    detector_class,
    float16_detectors,
    logit_only_detectors,
    reference_name,
    relative_count,
    resolve_detectors,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Detector", "DetectorNotApplicable", "available_detectors", "build_detector", "detector_class", "float16_detectors", "logit_only_detectors", "reference_name", "relative_count",
           "resolve_detectors"]
