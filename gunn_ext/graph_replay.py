"""CUDA graph replay of a Python op body (the triton ops).

The same policy as the native op's replay (``csrc/cuda/graph_replay.cpp``):
a call is identified by its signature, the shapes, strides, dtypes, devices
and data pointers of every tensor argument, the other arguments, the float32
matmul precision and the current stream. The first sighting of a signature
runs eagerly (compiling and autotuning the kernels), the second captures the
call into a CUDA graph with a private memory pool, later ones replay it: one
graph launch instead of hundreds of kernel launches from Python. A signature evicted from
the LRU cache and seen again is captured once more at most, then runs
eagerly. Replays write into the graph's own outputs, which are copied into
fresh tensors for the caller, so no two calls share an output; a graph
dropped from the cache is released once the device is past its last replay.

Calls on a stream that is already capturing (a user's own graph,
``torch.compile(mode="reduce-overhead")``) run eagerly inside that capture.
The switches are those of :mod:`gunn_ext.cuda_graphs`.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import torch
from torch.utils import _pytree as pytree


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "")
    if not value:
        return default
    return value.lower() not in ("0", "false", "off", "no")


def _env_capacity() -> int:
    value = os.environ.get("GUNN_EXT_CUDA_GRAPHS_CACHE", "")
    if not value:
        return 8
    if not value.isdigit():
        raise ValueError(f"GUNN_EXT_CUDA_GRAPHS_CACHE must be a non-negative integer, got {value!r}")
    return int(value)


_enabled = _env_flag("GUNN_EXT_CUDA_GRAPHS", True)
MAX_CAPTURES = 2  # per signature: the first capture, and one after an eviction


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> bool:
    global _enabled
    previous, _enabled = _enabled, flag
    return previous


class Counts(NamedTuple):
    """Calls of one op: captured, replayed, run eagerly; graphs cached now."""
    captures: int
    replays: int
    eager: int
    cached: int


def signature(args: tuple) -> tuple:
    """Everything a captured call depends on, as a hashable tuple."""
    def describe(a: Any):
        if isinstance(a, torch.Tensor):
            return (a.data_ptr(), a.dtype, a.device, tuple(a.shape), a.stride())
        if isinstance(a, (list, tuple)):
            return tuple(describe(v) for v in a)
        return a
    return describe(args) + (torch.get_float32_matmul_precision(),)


def _first_tensor(args: tuple) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


class CudaGraph:
    """One captured call: ``capture`` records ``fn(*args)``, ``launch`` replays it
    on the current stream, ``record_use`` marks the point after which nothing
    the caller issued reads the graph's memory, and ``busy`` says whether the
    device has not passed that point yet."""

    _streams: dict[int, torch.cuda.Stream] = {}

    def capture(self, fn: Callable, args: tuple):
        device = _first_tensor(args).device
        if device.index not in self._streams:
            self._streams[device.index] = torch.cuda.Stream(device)
        stream = self._streams[device.index]
        self.graph, self.done = torch.cuda.CUDAGraph(), torch.cuda.Event()
        pool = torch.cuda.graph_pool_handle()
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                outputs = fn(*args)
            finally:
                try:
                    self.graph.capture_end()
                except RuntimeError:
                    # An invalidated capture raises before the allocator stops routing
                    # this thread's allocations to the graph's pool.
                    try:
                        torch._C._cuda_endAllocateToPool(device.index, pool)
                    except RuntimeError:
                        pass  # it had stopped already
                    raise
        torch.cuda.current_stream(device).wait_stream(stream)
        return outputs

    def launch(self) -> None:
        self.graph.replay()

    def record_use(self) -> None:
        self.done.record()

    def busy(self) -> bool:
        return not self.done.query()


_LOCK = threading.Lock()  # captures share a side stream per device: one call at a time


class GraphReplay:
    """``fn`` replayed as one CUDA graph per recurring signature (see the module doc)."""

    def __init__(self, fn: Callable, *, graph_type: type = CudaGraph, device_type: str = "cuda",
                 capacity: int | None = None):
        self.fn, self.graph_type, self.device_type = fn, graph_type, device_type
        self.capacity = _env_capacity() if capacity is None else capacity
        self.graphs: OrderedDict[tuple, tuple[Any, list[torch.Tensor], Any]] = OrderedDict()
        self.history: OrderedDict[tuple, list[int]] = OrderedDict()  # signature -> [sightings, captures]
        self.retired: list = []  # dropped graphs whose last replay may still be running
        self.counts = {"captures": 0, "replays": 0, "eager": 0}
        self.broken = False

    def stats(self) -> Counts:
        return Counts(**self.counts, cached=len(self.graphs))

    def clear(self) -> None:
        with _LOCK:
            self.retired += [graph for graph, _, _ in self.graphs.values()]
            self.graphs.clear()
            self.history.clear()
            self.counts = dict.fromkeys(self.counts, 0)
            self.broken = False

    def _eligible(self, tensor: torch.Tensor | None) -> bool:
        if not _enabled or self.broken or self.capacity == 0:
            return False
        if tensor is None or tensor.device.type != self.device_type:
            return False
        return not (self.device_type == "cuda" and torch.cuda.is_current_stream_capturing())

    def _eager(self, args: tuple):
        self.counts["eager"] += 1
        return self.fn(*args)

    def __call__(self, *args):
        tensor = _first_tensor(args)
        on_gpu = tensor is not None and tensor.device.type == "cuda"
        with torch.cuda.device(tensor.device) if on_gpu else contextlib.nullcontext():
            if not self._eligible(tensor):
                return self._eager(args)
            # The stream too: replays of one graph from two streams would share its memory.
            key = signature(args) + ((torch.cuda.current_stream().cuda_stream,) if on_gpu else ())
            with _LOCK:
                return self._replay(key, args)

    def _replay(self, key: tuple, args: tuple):
        self.retired = [graph for graph in self.retired if graph.busy()]
        entry = self.graphs.get(key)
        if entry is None:
            seen = self.history.setdefault(key, [0, 0])
            self.history.move_to_end(key)
            while len(self.history) > 4 * max(self.capacity, 1):
                self.history.popitem(last=False)
            seen[0] += 1
            if seen[0] < 2 or seen[1] >= MAX_CAPTURES:
                return self._eager(args)
            entry = self._capture(args)
            if entry is None:
                return self._eager(args)
            seen[1] += 1
            self.graphs[key] = entry
            if len(self.graphs) > self.capacity:
                self.retired.append(self.graphs.popitem(last=False)[1][0])
        else:
            self.graphs.move_to_end(key)
        graph, outputs, spec = entry
        graph.launch()
        self.counts["replays"] += 1
        fresh = [torch.empty_like(t) for t in outputs]
        torch._foreach_copy_(fresh, outputs)
        graph.record_use()
        return pytree.tree_unflatten(fresh, spec)

    def _capture(self, args: tuple):
        graph = self.graph_type()
        try:
            outputs = graph.capture(self.fn, args)
        except Exception as exc:  # noqa: BLE001 - any failed capture falls back to eager
            self.broken = True
            self.failed = graph  # kept: its pool may hold allocations made during the capture
            warnings.warn(f"gunn_ext: CUDA graph capture failed ({exc}); running eagerly from now on",
                          RuntimeWarning, stacklevel=4)
            return None
        self.counts["captures"] += 1
        flat, spec = pytree.tree_flatten(outputs)
        return graph, flat, spec
