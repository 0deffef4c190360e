"""Adam preconditioner staleness: the detector of ``adam/stale_frac/<module>``.

The signal (:class:`seismo.monitor.AdamStalenessProbe`) is the fraction of a module's coordinates
whose squared gradient is 100x below Adam's bias-corrected second moment: the preconditioner still
describes gradients that are gone (typically the ~1 / (1 - beta2) steps after a gradient spike), and
those coordinates' updates are damped by ``|g| / sqrt(v_hat)`` (arXiv 2506.04805; the momentum reset
of SPAM, Huang et al. 2025, arXiv 2501.06842, is the remedy that paper family uses). Stationary
Gaussian gradients give ~0.08, so the defaults warn at 0.5 and call it critical at 0.9, after three
consecutive observations, past Adam's first ``min_step`` steps, embeddings excluded (rows of tokens
absent from a batch have ``g = 0`` by construction).

Kind ``preconditioner_staleness``; its playbook entry is in :mod:`seismo.diagnose.playbook`. It is
not in :func:`~seismo.diagnose.default_detectors` (whose kinds are frozen): add
``PreconditionerStalenessDetector()`` to a detector list, with ``AdamStalenessProbe()`` in the monitor.
"""

from __future__ import annotations

from typing import Mapping

from seismo.diagnose.detectors import ThresholdDetector
from seismo.events import Event

__all__ = ["PreconditionerStalenessDetector", "STALENESS_KIND"]

STALENESS_KIND = "preconditioner_staleness"


class PreconditionerStalenessDetector:
    """``adam/stale_frac/<module>`` above ``warn`` (``critical``) for ``min_consecutive`` observations."""

    name = STALENESS_KIND

    def __init__(self, warn: float = 0.5, critical: float = 0.9, min_consecutive: int = 3, min_step: int = 20,
                 exclude: tuple[str, ...] = ("wte", "wpe", "embed")):
        if not 0.0 < warn <= critical <= 1.0:
            raise ValueError(f"need 0 < warn <= critical <= 1, got {warn}, {critical}")
        self.min_step = min_step
        self.rule = ThresholdDetector(STALENESS_KIND, "adam/stale_frac/", warn, critical, min_consecutive=min_consecutive,
                                      exclude=exclude, what="fraction of Adam coordinates with g^2 < v_hat / 100")

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        if step < self.min_step:
            return []
        return self.rule.update(step, values)

    def state_dict(self) -> dict:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state)
