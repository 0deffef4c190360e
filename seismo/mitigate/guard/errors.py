"""What the Guard raises and warns with."""

from __future__ import annotations

__all__ = ["GuardGaveUp", "GuardResumeError", "GuardWarning"]


class GuardGaveUp(RuntimeError):
    """The Guard stopped training: a spike did not go away after the allowed rollbacks (or, under
    the ``skip`` policy, did not recover at all). The message is the diagnosis; the attributes
    hold the same facts for programs."""

    def __init__(self, message: str, *, step: int, data_index: int, reasons: list[str],
                 rollbacks: list[dict], evidence: dict):
        super().__init__(message)
        self.step = step
        self.data_index = data_index
        self.reasons = reasons
        self.rollbacks = rollbacks
        self.evidence = evidence


class GuardResumeError(RuntimeError):
    """``Guard.resume()`` found snapshots or a tracker it cannot read; nothing was changed.
    ``resume(fresh_if_unreadable=True)`` moves them aside and starts from step 0."""


class GuardWarning(RuntimeWarning):
    """Once-per-run conditions: a misconfiguration the Guard works around (a skip mode that cannot be
    exact, in-memory-only checkpoints, a disk that stopped taking snapshots, an unreadable snapshot).
    Skips, rollbacks and give-ups are events (logger ``seismo.guard``, event sinks), not warnings."""
