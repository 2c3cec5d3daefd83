"""Training GUNN/SUNN networks: ``python -m gunn_ext.train --help``.

The library entry point is :func:`fit`, which takes a :class:`TrainConfig`.
"""
from .config import RECIPES, TrainConfig
from .trainer import FitResult, Position, SetupError, fit

__all__ = ["fit", "TrainConfig", "FitResult", "Position", "SetupError", "RECIPES"]
