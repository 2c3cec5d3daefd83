"""Two rules every implementation of the layer op follows, in one place, and
the switches that set the precision of its float32 products.

``csrc/conventions.h`` states the same rules for the C++ op.

* **Output memory format.** The op's output and input gradient are
  channels_last when ``x`` is channels_last (and not also contiguous, as a
  tensor with one channel or a 1x1 image is), else contiguous.
* **Statistics dtype.** BatchNorm statistics (the op's ``mean`` and ``var``)
  are float64 for float64 inputs and float32 for every other dtype.

**Float32 products on the GPU.** The layer's products are convolutions. The
reference's (``nn.Conv2d``) and the native op's 3x3s follow cuDNN's TF32
switch, ``torch.backends.cudnn.allow_tf32``, on by default; the native op's
1x1s run as GEMMs and the Triton kernels' products as dots, which follow the
float32 matmul precision, ``torch.set_float32_matmul_precision``,
``"highest"`` (IEEE float32) by default. :func:`float32_products` sets both
at once, so that every backend multiplies in the same precision.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

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


@contextlib.contextmanager
def float32_products(tf32: bool) -> Iterator[None]:
    """Within: every float32 product of every backend in TF32 (``tf32``), or in
    IEEE float32, cuDNN's convolutions included; both switches restored after."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
