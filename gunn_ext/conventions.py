"""Two rules every implementation of the layer op follows, in one place, and
the switches that set the precision of its float32 products.

``csrc/conventions.h`` states the same rules for the C++ op.

* **Output memory format.** The op's output and input gradient are
  channels_last when ``x`` is channels_last (and not also contiguous, as a
  tensor with one channel or a 1x1 image is), else contiguous.
* **Statistics dtype.** BatchNorm statistics (the op's ``mean`` and ``var``)
  are float64 for float64 inputs and float32 for every other dtype.

**Float32 products on the GPU.** The layer's products are convolutions. The
reference's (``nn.Conv2d``) and the native op's library 3x3s follow cuDNN's
TF32 switch, ``torch.backends.cudnn.allow_tf32``, on by default; the native
op's 1x1s run as GEMMs and the Triton kernels' products as dots, which
follow the float32 matmul precision, ``torch.set_float32_matmul_precision``,
``"highest"`` (IEEE float32) by default; the native op's own kernels (narrow
units) multiply in IEEE float32. :func:`float32_products` sets both switches
at once, so that the libraries and Triton multiply in the same precision.
"""
from __future__ import annotations

import contextlib
import functools
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


@functools.cache  # the switches are torch.backends' singletons; the key of every replayed call reads them
def _fp32_switches() -> tuple | None:
    """Every ``fp32_precision`` switch of this torch (generic, cuBLAS, cuDNN,
    oneDNN), or None where it has none. Their getters never raise, where the
    legacy ones (``allow_tf32``, ``get_float32_matmul_precision``) raise once
    a program has set the switches to mixed values through the new API."""
    b = torch.backends
    if not hasattr(b.cuda.matmul, "fp32_precision"):
        return None
    candidates = [b, b.cuda.matmul, b.cudnn, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
                  b.mkldnn, *(getattr(b.mkldnn, op, None) for op in ("matmul", "conv", "rnn"))]
    return tuple(c for c in candidates if c is not None and hasattr(c, "fp32_precision"))


def _resolved(*chain) -> str:
    """The value of the first switch of ``chain`` (child first) that is set:
    "tf32", or "ieee" for anything else (CUDA has no bfloat16 float32 mode)."""
    values = (getattr(s, "fp32_precision", "none") for s in chain)
    return "tf32" if next((v for v in values if v != "none"), "ieee") == "tf32" else "ieee"


def precision_state() -> tuple[str, str]:
    """The precisions float32 products take now: ``(cuBLAS matmuls, cuDNN
    convolutions)``, each "ieee" or "tf32", for keys and reports."""
    b = torch.backends
    if _fp32_switches() is None:
        matmul = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        return matmul, "tf32" if b.cudnn.allow_tf32 else "ieee"
    return _resolved(b.cuda.matmul, b), _resolved(getattr(b.cudnn, "conv", None), b.cudnn, b)


def matmul_tf32() -> bool:
    """Whether float32 matmuls on the GPU may multiply in reduced precision (TF32)."""
    return precision_state()[0] != "ieee"


@contextlib.contextmanager
def float32_products(tf32: bool | None) -> Iterator[None]:
    """Within: every float32 product of every backend in TF32 (``tf32``), or in
    IEEE float32, cuDNN's convolutions included; the switches restored after.
    ``None`` leaves the switches as they are.

    Set through the legacy switches, which code such as ``torch.compile``
    reads, and through the fp32_precision switches of cuBLAS and cuDNN, so
    that no switch above them decides; every switch gets its value back."""
    if tf32 is None:
        yield
        return
    legacy = _legacy_switches()
    switches = _fp32_switches()
    raw = [s.fp32_precision for s in switches] if switches else None
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    if switches:
        b = torch.backends
        for switch in (b.cuda.matmul, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None)):
            if switch is not None:
                switch.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        if switches:  # what the legacy setters could not express ("none": inherit)
            for switch, value in zip(switches, raw):
                if switch.fp32_precision != value:
                    switch.fp32_precision = value


def _legacy_switches() -> tuple | None:
    """The legacy switches' values, or None where their getters refuse (the
    fp32_precision switches were set to mixed values)."""
    try:
        # cuda.matmul.allow_tf32 follows the matmul precision; reading it checks that it can be read.
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018
        return torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return None
