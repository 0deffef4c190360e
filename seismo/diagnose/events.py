"""Events: what a detector says happened, with evidence and advice."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Event", "SEVERITIES", "KINDS"]

SEVERITIES = ("info", "warning", "critical")

#: Every event kind a built-in detector can emit (public API: names are frozen by a test).
KINDS = (
    "loss_spike",
    "loss_divergence",
    "grad_spike",
    "nonfinite",
    "attention_logit_growth",
    "attention_entropy_collapse",
    "output_logit_divergence",
    "edge_of_stability",
    "adam_decorrelation",
    "epsilon_regime",
    "softmax_collapse",
    "gradient_variance_extreme",
    "activation_growth",
    "stall",
)


@dataclass
class Event:
    """One named instability.

    ``severity`` is ``info``, ``warning`` (early warning or mild) or ``critical``; ``module`` is
    the module held responsible ("" when the signal is global); ``evidence`` holds the numbers
    the decision was made on; ``advice`` is the playbook's first recommendation.
    """

    kind: str
    severity: str
    step: int
    module: str = ""
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    advice: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
