"""gunn_ext: Gradually Updated Neural Networks, fast, for PyTorch."""
from .backends import available_backends
from .layers import Bottleneck, GUNNLayer, SUNNLayer, UpdateUnit

__all__ = ["GUNNLayer", "SUNNLayer", "UpdateUnit", "Bottleneck", "available_backends"]
__version__ = "0.1.0"
