"""Backend registry: which implementations of the layer exist in this install.

``reference``  the naive PyTorch loop (always available; the test oracle)
``native``     the compiled ``torch.ops.gunn_ext`` op (C++ CPU kernel, CUDA kernel)
``triton``     Triton kernels (needs the optional ``triton`` package and a GPU,
               or ``TRITON_INTERPRET=1`` for CPU tensors)
``auto``       the fastest available for the input's device
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from . import extras, ops, reference

NAMES = ("reference", "native", "triton")
_AUTO_ORDER = {"cuda": ("native", "triton", "reference"), "cpu": ("native", "reference")}


def check_name(name: str) -> str:
    if name != "auto" and name not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {available_backends()}, got {name!r}")
    return name


# What this install has, read once at import (plain values that torch.compile
# can trace through).
INSTALL = {
    "native_error": ops.load_error(),
    "native_cuda": ops.has_cuda_kernels(),
    "triton_installed": importlib.util.find_spec("triton") is not None,
}


def _why_unavailable(name: str, device: torch.device | None = None) -> str | None:
    """None if ``name`` runs here (on ``device`` if given), else the reason."""
    if name == "reference":
        return None
    if name == "native":
        reason = INSTALL["native_error"]
        if reason is None and device is not None and device.type == "cuda" and not INSTALL["native_cuda"]:
            reason = ("the compiled extension was built without CUDA kernels; rebuild with "
                      "CUDA available: pip install --no-build-isolation .")
        return reason
    if name == "triton":
        if not INSTALL["triton_installed"]:
            return f"triton is not installed: {extras.install_hint('triton', 'triton')}"
        if device is not None and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device is None and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton needs a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors"
        return None
    raise ValueError(f"backend must be 'auto' or one of {available_backends()}, got {name!r}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that work in this install (for ``device``, if given)."""
    device = None if device is None else torch.device(device)
    return [n for n in NAMES if _why_unavailable(n, device) is None]


def _implementation(name: str) -> Callable:
    if name == "reference":
        return reference.gradual_update_reference
    if name == "native":
        return ops.gradual_update_native
    from . import triton_backend  # imports triton itself only when first run
    return triton_backend.gradual_update_triton


def resolve(name: str, device_type: str) -> str:
    """The backend that runs ``name`` on ``device_type`` (``auto`` picks the fastest)."""
    device = torch.device(device_type)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            reason = _why_unavailable(candidate, device)
            if reason is None:
                return candidate
            if candidate == "native":
                ops.warn_once(f"native backend unavailable ({reason}); falling back", stacklevel=5)
        return "reference"
    reason = _why_unavailable(name, device)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available on {device_type}: {reason}. "
                         f"Available: {available_backends(device)}")
    return name


def get(name: str, device: torch.device) -> Callable:
    """The implementation ``fn(layer, x)`` for backend ``name`` on ``device``."""
    return _implementation(resolve(name, device.type))


def check_input(layer, x) -> None:
    """Errors that name the argument, the expectation and what came."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (batch, channels={layer.channels}, height, width), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != layer.channels:
        raise ValueError(f"input must have channels={layer.channels} (dim 1), got shape {tuple(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"input must have height and width >= 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
    weight = layer.conv_weight
    if weight.device != x.device:
        raise ValueError(f"input is on {x.device} but the layer's parameters are on {weight.device}; "
                         f"move one of them (layer.to({str(x.device)!r}))")
    if weight.dtype != x.dtype and ops.autocast_dtype(x) is None:
        raise TypeError(f"input has dtype {x.dtype} but the layer's parameters have dtype {weight.dtype}; "
                        f"use layer.to({x.dtype}) or torch.autocast")
