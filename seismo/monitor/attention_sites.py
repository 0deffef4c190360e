"""Old path of the attention sites, kept for one release: see :mod:`seismo.monitor.attention`."""

from seismo.monitor.attention.interception import _dispatch, is_intercepting
from seismo.monitor.attention.logits import mha_logits, sdpa_logits
from seismo.monitor.attention.sites import HFAttentionSite, MHASite, SDPASite, find_generic_sites

__all__ = ["find_generic_sites", "MHASite", "SDPASite", "HFAttentionSite", "sdpa_logits", "mha_logits", "is_intercepting", "_dispatch"]
