"""seismo: make neural-network training instabilities visible, explainable and fixable."""

from seismo.mitigate.guard import Guard, GuardConfig, GuardGaveUp
from seismo.monitor import MonitorConfig
from seismo.session import Monitor

__version__ = "0.1.0"
__all__ = ["Monitor", "MonitorConfig", "Guard", "GuardConfig", "GuardGaveUp", "__version__"]
