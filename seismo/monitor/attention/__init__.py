"""Attention signals of any model: logits computations, call interception, sites and the probe.

- :mod:`~seismo.monitor.attention.tap`: :class:`AttentionLogitTap`, the hook point a model that
  computes attention itself implements (seismo's TinyGPT does);
- :mod:`~seismo.monitor.attention.logits`: pre-softmax logits recomputed from a call's inputs;
- :mod:`~seismo.monitor.attention.interception`: which SDPA/softmax call belongs to which site
  (a ``TorchFunctionMode``);
- :mod:`~seismo.monitor.attention.discovery`: the attention modules, found by watching a forward;
- :mod:`~seismo.monitor.attention.sites`: sites for taps, ``nn.MultiheadAttention``, observed
  modules, Hugging Face attention and SDPA callers, and their static discovery;
- :mod:`~seismo.monitor.attention.probe`: :class:`AttentionProbe` and its statistics.

Design notes and trade-offs: docs/MONITOR.md.
"""

from seismo.monitor.attention.discovery import AttentionDiscovery
from seismo.monitor.attention.interception import Gate, LogitsCallback, is_intercepting
from seismo.monitor.attention.logits import mha_logits, sdpa_logits, softmax_logits
from seismo.monitor.attention.probe import AttentionProbe, attention_stats
from seismo.monitor.attention.sites import (
    AttentionSite,
    HFAttentionSite,
    MHASite,
    ObservedSite,
    SDPASite,
    find_attention_sites,
    find_generic_sites,
)
from seismo.monitor.attention.tap import AttentionLogitTap, TapSite, find_tap_sites

__all__ = [
    "AttentionProbe", "attention_stats", "AttentionSite", "AttentionLogitTap", "TapSite", "LogitsCallback",
    "find_attention_sites", "find_tap_sites", "find_generic_sites", "MHASite", "SDPASite", "HFAttentionSite",
    "sdpa_logits", "mha_logits", "softmax_logits", "is_intercepting", "AttentionDiscovery", "ObservedSite", "Gate",
]
