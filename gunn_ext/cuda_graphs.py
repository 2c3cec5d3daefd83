"""CUDA graph replay of the native op.

On the GPU, ``torch.ops.gunn_ext.gradual_update`` and its backward replay one
CUDA graph per call once a call recurs: same shapes, strides, dtypes, flags
and data pointers of every input and output (the caching allocator returns
the same blocks every step of a training loop). The first sighting of a call
runs eagerly, the second captures it, later ones replay it: one launch per
layer and pass instead of hundreds. Calls made while a stream is capturing
(a user's own graph, ``torch.compile(mode="reduce-overhead")``) run eagerly
inside that capture.

Switches: ``GUNN_EXT_CUDA_GRAPHS=0`` in the environment, or :func:`set_enabled`
/ :func:`disabled` at run time; ``GUNN_EXT_CUDA_GRAPHS_CACHE`` graphs are kept
per op (default 8), each with a private memory pool for its intermediates.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from . import ops


class CacheStats(NamedTuple):
    captures: int
    replays: int
    eager: int
    cached: int


def available() -> bool:
    """True when the extension was built with the CUDA kernels."""
    return ops.has_cuda_kernels() and hasattr(torch.ops.gunn_ext, "set_cuda_graphs")


def _require() -> None:
    if not available():
        raise RuntimeError("gunn_ext CUDA graphs need the extension built with CUDA kernels; "
                           f"{ops.load_error() or 'this build has none'}")


def enabled() -> bool:
    """Whether native calls on the GPU may be captured and replayed."""
    return available() and bool(torch.ops.gunn_ext.cuda_graphs_enabled())


def set_enabled(flag: bool) -> bool:
    """Turns replay on or off; returns the previous setting."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {flag!r}")
    _require()
    return bool(torch.ops.gunn_ext.set_cuda_graphs(flag))


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Runs the block with replay off (everything eager)."""
    if not available():
        yield
        return
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def stats() -> dict[str, CacheStats]:
    """Capture / replay / eager counts and cached graphs, per op."""
    _require()
    counts = list(torch.ops.gunn_ext.cuda_graphs_stats())
    return {"forward": CacheStats(*counts[:4]), "backward": CacheStats(*counts[4:])}


def clear() -> None:
    """Drops every cached graph and its memory pool (and the call history)."""
    _require()
    torch.ops.gunn_ext.clear_cuda_graphs()
