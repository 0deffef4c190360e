"""Small-scale proxy lab: TinyGPT, embedded data, the training loop and presets."""

from seismo.errors import ConfigError
from seismo.proxy.autopsy import autopsy  # seismo.proxy.autopsy is the function, as seismo.proxy.train is
from seismo.proxy.data import DataConfig, load_dataset
from seismo.proxy.model import GPTConfig, TinyGPT
from seismo.proxy.presets import PRESETS, get_preset
from seismo.proxy.train import OptimConfig, RunResult, SeqlenWarmupConfig, TrainConfig, train

__all__ = [
    "TinyGPT", "GPTConfig", "ConfigError", "DataConfig", "load_dataset", "TrainConfig", "OptimConfig",
    "SeqlenWarmupConfig", "RunResult", "train", "PRESETS", "get_preset", "autopsy",
]
