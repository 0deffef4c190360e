"""The Guard: skip spiking steps and roll back past bad data (docs/GUARD.md).

One job per module: :mod:`.config` (``GuardConfig``), :mod:`.window` (the device-side spike
detector), :mod:`.skip` (skipping a step without a host sync), :mod:`.snapshots` (checkpoints,
snapshot files, the tracker), :mod:`.messages` (what the user is told), :mod:`.reporting` (where
events go), :mod:`.data_ranges` (skipped data), :mod:`.guard` (the ``Guard`` tying them together).
"""

from seismo.mitigate.guard.config import POLICIES, SKIP_MODES, GuardConfig
from seismo.mitigate.guard.data_ranges import data_index
from seismo.mitigate.guard.errors import GuardGaveUp, GuardResumeError, GuardWarning
from seismo.mitigate.guard.guard import Guard
from seismo.mitigate.guard.messages import GUARD_KINDS
from seismo.mitigate.guard.snapshots import TRACKER_NAME
from seismo.mitigate.guard.window import REASONS

__all__ = [
    "Guard", "GuardConfig", "GuardGaveUp", "GuardResumeError", "GuardWarning", "GUARD_KINDS", "POLICIES", "SKIP_MODES",
    "REASONS", "TRACKER_NAME", "data_index",
]
