"""Old path of :mod:`seismo.monitor.tracking` (tracking schedules), kept for one release."""

from seismo.monitor.tracking import Schedule, every, log_spaced

__all__ = ["Schedule", "every", "log_spaced"]
