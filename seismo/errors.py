"""The one error type for bad configuration anywhere in seismo."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field.

    Raised at construction (``MonitorConfig``, ``GuardConfig``, the proxy's configs, CLI
    overrides), so a bad setting fails before training starts, with one line that says what to fix.
    """
