"""nanoseek: the DeepSeek-V3 architecture and the R1 recipe in compact, fast PyTorch."""

from nanoseek.checkpoint.hf import load_model, save_model
from nanoseek.config import ModelConfig
from nanoseek.infer.engine import Engine
from nanoseek.model import Losses, Transformer

__all__ = ["Engine", "Losses", "ModelConfig", "Transformer", "load_model", "save_model"]
__version__ = "0.1.0"
