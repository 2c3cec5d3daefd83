"""CUDA graph replay of the layer ops.

On the GPU, ``torch.ops.gunn_ext.gradual_update`` (native) and the triton
ops each replay one CUDA graph per call once a call recurs: same shapes,
strides, dtypes, flags and data pointers of every input (the caching
allocator returns the same blocks every step of a training loop). The first
sighting of a call runs eagerly, the second captures it, later ones replay
it: one launch per layer and pass instead of hundreds. Calls made while a
stream is capturing (a user's own graph, ``torch.compile(mode="reduce-overhead")``)
run eagerly inside that capture. The native op's replay lives in
``csrc/cuda/graph_replay.cpp``, the triton ops' in :mod:`gunn_ext.graph_replay`.

Switches, for both: ``GUNN_EXT_CUDA_GRAPHS=0`` in the environment, or
:func:`set_enabled` / :func:`disabled` at run time; ``GUNN_EXT_CUDA_GRAPHS_CACHE``
graphs are kept per op (default 8), each with a private memory pool for its
intermediates.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
import torch

from . import graph_replay, ops
from .graph_replay import Counts as CacheStats


def available() -> bool:
    """True when the extension was built with the CUDA kernels (the native op's replay)."""
    return ops.has_cuda_kernels() and hasattr(torch.ops.gunn_ext, "set_cuda_graphs")


def enabled() -> bool:
    """Whether calls on the GPU may be captured and replayed."""
    return graph_replay.enabled()


def set_enabled(flag: bool) -> bool:
    """Turns replay on or off for every op; returns the previous setting."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {flag!r}")
    if available():
        torch.ops.gunn_ext.set_cuda_graphs(flag)
    return graph_replay.set_enabled(flag)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Runs the block with replay off (everything eager)."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def _triton_replays() -> dict[str, graph_replay.GraphReplay]:
    """The triton ops' replays, if that backend has been loaded (never imported from here)."""
    backend = sys.modules.get("gunn_ext.triton_backend")
    return {} if backend is None else {"triton_forward": backend.FORWARD, "triton_backward": backend.BACKWARD}


def stats() -> dict[str, CacheStats]:
    """Capture / replay / eager counts and cached graphs, per op: ``forward`` and
    ``backward`` (native, when built with CUDA), ``triton_forward`` and
    ``triton_backward`` (once the triton backend has run)."""
    out = {}
    if available():
        counts = list(torch.ops.gunn_ext.cuda_graphs_stats())
        out.update(forward=CacheStats(*counts[:4]), backward=CacheStats(*counts[4:]))
    out.update({name: replay.stats() for name, replay in _triton_replays().items()})
    return out


def clear() -> None:
    """Drops every cached graph and its memory pool (and the call history)."""
    if available():
        torch.ops.gunn_ext.clear_cuda_graphs()
    for replay in _triton_replays().values():
        replay.clear()
