"""Two rules every implementation of the layer op follows, in one place.

``csrc/conventions.h`` states the same rules for the C++ op.

* **Output memory format.** The op's output and input gradient are
  channels_last when ``x`` is channels_last (and not also contiguous, as a
  tensor with one channel or a 1x1 image is), else contiguous.
* **Statistics dtype.** BatchNorm statistics (the op's ``mean`` and ``var``)
  are float64 for float64 inputs and float32 for every other dtype.
"""
from __future__ import annotations

import torch


def output_is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if output_is_channels_last(x) else torch.contiguous_format


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like ``x`` in the op's output memory format."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
