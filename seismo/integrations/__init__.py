"""seismo inside training frameworks: one callback each, nothing else in the user's code changes.

- :mod:`seismo.integrations.huggingface`: ``SeismoCallback`` for ``transformers.Trainer`` (extra ``hf``).
- :mod:`seismo.integrations.lightning`: ``SeismoCallback`` for Lightning 2.x (extra ``lightning``).

Each submodule imports its framework; this package imports neither. See docs/INTEGRATIONS.md.
"""
