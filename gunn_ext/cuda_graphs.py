"""CUDA graph replay of the layer ops: the switch and the counts.

On the GPU the forward and the backward of a layer, with the native or the
triton backend, each run as one CUDA graph launch once captured, instead of
hundreds of kernel launches (the engine: :mod:`gunn_ext.graph_replay`).

- **Keyed** by the activations' shapes, strides, dtypes and device, the op's
  other arguments, the cuBLAS / cuDNN switches, the current stream, and the
  layer: its parameters' addresses, shapes, strides and dtypes. Not by the
  activations' addresses: a graph copies its input in and its results out into
  fresh tensors. Parameters are read in place, so in-place optimizer updates
  replay, and a replaced parameter tensor makes new graphs; under autocast the
  per-call casts of the convolution weights are copied in like activations.
- **Cached** per layer and pass: up to ``GUNN_EXT_CUDA_GRAPHS_CACHE`` graphs
  (default 8), least recently used out first, an evicted call captured again
  when it comes back. A graph holds a private memory pool (its call's outputs
  and intermediates, about the op's peak working memory) plus static copies of
  its activations (the input; for the backward ``grad_y``, ``x``, ``y`` and the
  statistics). Layers whose parameters are freed are dropped.
- **Captured** at a call's first sighting, after one eager warm-up run that
  compiles and tunes the kernels. A failed capture warns once with its reason
  and turns replay off for the process. Calls made while a stream is capturing
  (a user's own graph, ``torch.compile(mode="reduce-overhead")``) run eagerly
  inside that capture.

Switches: ``GUNN_EXT_CUDA_GRAPHS=0`` (or ``false``, ``off``, ``no``, any case)
in the environment, or :func:`set_enabled` / :func:`disabled` at run time.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import graph_replay
from .graph_replay import Counts


def enabled() -> bool:
    """Whether calls on the GPU may be captured and replayed."""
    return graph_replay.enabled()


def set_enabled(flag: bool) -> bool:
    """Turns replay on or off for every op of both backends; returns the previous setting."""
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {flag!r}")
    return graph_replay.set_enabled(flag)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Runs the block with replay off (everything eager)."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def stats() -> dict[str, Counts]:
    """Captures, replays, eager runs, cached graphs and layers, per op:
    ``native_forward`` and ``native_backward`` (when built with CUDA),
    ``triton_forward`` and ``triton_backward`` (once the triton backend is loaded)."""
    return {name: engine.stats() for name, engine in graph_replay.ENGINES.items()}


def clear() -> None:
    """Drops every cached graph (with its memory pool) and resets the counts."""
    for engine in graph_replay.ENGINES.values():
        engine.clear()
