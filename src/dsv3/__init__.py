"""dsv3: DeepSeek-V3's training and inference system on PyTorch.

The top-level import is light: torch and the model only (no transformers, no Triton).
"""

from .config import ModelConfig
from .params import count_parameters

__version__ = "0.1.0"

__all__ = ["ModelConfig", "count_parameters", "Transformer", "load_pretrained", "save_pretrained"]


def __getattr__(name):  # lazy: keep `import dsv3` cheap
    if name == "Transformer":
        from .model import Transformer
        return Transformer
    if name in ("load_pretrained", "save_pretrained"):
        from . import hf
        return getattr(hf, name)
    if name in ("fp8", "eplb", "balance", "parallel", "data", "train", "plan", "infer"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")
