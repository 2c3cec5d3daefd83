"""The naive loop in pure PyTorch: the oracle for every other backend.

It runs the layer's own modules with ordinary autograd, so BatchNorm and its
running statistics behave exactly as ``nn.BatchNorm2d`` does.
"""
from __future__ import annotations

import torch


def gradual_update_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """``y`` of a GUNN layer (``layer.sequential``) or a SUNN layer, naively."""
    state = x
    with layer.units.split_views():
        for unit, (start, stop) in zip(layer.units, layer.bounds):
            source = state if layer.sequential else x
            updated = state[:, start:stop] + unit(source)
            state = torch.cat([state[:, :start], updated, state[:, stop:]], dim=1)
    return state
