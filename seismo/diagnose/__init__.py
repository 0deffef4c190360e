"""Online detectors that name each instability, point at the module, warn early and advise.

See docs/DIAGNOSE.md.
"""

from seismo.diagnose.detectors import (
    AdamDecorrelationDetector,
    Detector,
    EdgeOfStabilityDetector,
    GrowthDetector,
    LossRegressionDetector,
    NonFiniteDetector,
    SpikeDetector,
    StallDetector,
    ThresholdDetector,
    default_detectors,
)
from seismo.diagnose.engine import AlertPrinter, Diagnoser, Diagnosis, diagnose_history, diagnose_run
from seismo.diagnose.playbook import PLAYBOOK, Mitigation, mitigations_for
from seismo.diagnose.staleness import PreconditionerStalenessDetector
from seismo.events import KINDS, Event

__all__ = [
    "Event", "KINDS", "Detector", "SpikeDetector", "GrowthDetector", "LossRegressionDetector", "ThresholdDetector", "NonFiniteDetector",
    "AdamDecorrelationDetector", "EdgeOfStabilityDetector", "StallDetector", "default_detectors",
    "PreconditionerStalenessDetector",
    "Diagnoser", "Diagnosis", "AlertPrinter", "diagnose_history", "diagnose_run", "PLAYBOOK", "Mitigation", "mitigations_for",
]
