"""CUDA graph replay of the layer ops: one engine for the native and the triton backend.

A layer op launches hundreds of kernels from the host. On the GPU each op
(forward and backward, of either backend) goes through a :class:`GraphReplay`
that captures a call into a CUDA graph once and replays it afterwards: one
graph launch per layer and pass.

**Where it sits.** The triton ops are Python ``custom_op`` bodies, so the
engine is Python and the body calls it. The native op keeps its C++ schema,
fake kernel and autograd formula; its CUDA kernel is a Python kernel
(``torch.library.register_kernel``, :mod:`gunn_ext.native_cuda`) that calls the
engine around a private eager op registered from C++ beside the CUDA kernels
(``csrc/cuda/gradual_update_cuda.cpp``). The public op stays one opaque node for
``torch.compile(fullgraph=True)``, ``opcheck`` and autograd see the same op as
before, and both backends share one policy.

**Keys.** An op wrapper names its arguments' roles: *activations* (new
tensors every call), *parameters* (tensors that live across calls: weights,
BatchNorm affine and running statistics) and *config* (everything else). A
call's key is made of the activations' shapes, strides, dtypes and device, the
config, the flags that choose cuBLAS / cuDNN algorithms (:func:`backend_flags`)
and the current stream, never the activations' addresses. A graph owns static
copies of the activations: a replay copies the caller's activations in and its
results out into fresh tensors, so callers' tensors may live anywhere and no
two calls share an output. Parameters are read in place: a replay sees an
optimizer's in-place updates, and the parameters' addresses, shapes, strides
and dtypes are the *layer identity*, so a parameter replaced by another tensor
(``load_state_dict(..., assign=True)``, ``.to()``) makes a new layer whose calls
are captured anew, never a replay of stale weights. Under autocast the
convolution weights arrive as per-call casts (in another dtype than the
BatchNorm parameters): in those calls they are activations, copied in.

**Cache.** Graphs are grouped per layer identity; each layer keeps up to
``GUNN_EXT_CUDA_GRAPHS_CACHE`` graphs per pass (default 8), least recently
used out first. A cached graph holds its memory pool (the captured call's
outputs and intermediates, about the op's peak working memory) and static
copies of its activations (the input for the forward; ``grad_y``, ``x``,
``y`` and the statistics for the backward), allocated outside inference
mode so that any call may copy into them, contiguous unless the activation
is contiguous or channels_last (the layout the eager op gives it). Layers
whose parameters have been freed are dropped at the engine's next call (or
:meth:`GraphReplay.stats`), those given new storage in place
(``module.to()`` sets ``param.data``) when a new layer is seen, and
:meth:`GraphReplay.clear` drops every graph at once (those a replay still
runs, once it has run), so memory stays bounded by capacity x live layers x
passes. A key seen for the first time is captured at
once (after one eager warm-up run on the static inputs, which compiles and
tunes kernels outside the capture and gives the call its result); an evicted
key seen again is captured again. A layer that recaptures more evicted keys in a
row than its capacity without a replay cycles through more keys than fit:
the engine warns once, naming the switch to raise.

**Failures and exceptions.** A failed capture is reported once, with its
reason, as a ``RuntimeWarning``, and turns replay off for the process for both
backends (:func:`set_enabled` turns it back on). Calls on a stream that is
already capturing (a user's own graph, ``torch.compile(mode="reduce-overhead")``)
run eagerly inside that capture.

**Switch.** ``GUNN_EXT_CUDA_GRAPHS`` (``1/true/on/yes``, ``0/false/off/no``,
any case; default on) and :mod:`gunn_ext.cuda_graphs`, the user API.
"""
from __future__ import annotations

import contextlib
import operator
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from . import conventions

ON, OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")
DEFAULT_CAPACITY = 8


def parse_switch(name: str, value: str | None, default: bool) -> bool:
    """An on/off environment switch: ``1/true/on/yes`` or ``0/false/off/no``, any case."""
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in ON or word in OFF:
        return word in ON
    raise ValueError(f"{name} must be one of {'/'.join(ON)} or {'/'.join(OFF)} (any case), got {value!r}")


def parse_capacity(name: str, value: str | None, default: int) -> int:
    """A count of graphs from the environment: a non-negative integer."""
    if value is None or not value.strip():
        return default
    if not value.strip().isdigit():
        raise ValueError(f"{name} must be a non-negative integer (graphs per layer and pass), got {value!r}")
    return int(value)


_enabled = parse_switch("GUNN_EXT_CUDA_GRAPHS", os.environ.get("GUNN_EXT_CUDA_GRAPHS"), True)
CAPACITY = parse_capacity("GUNN_EXT_CUDA_GRAPHS_CACHE", os.environ.get("GUNN_EXT_CUDA_GRAPHS_CACHE"),
                          DEFAULT_CAPACITY)


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> bool:
    global _enabled
    previous, _enabled = _enabled, flag
    return previous


class Counts(NamedTuple):
    """Calls of one op: captured, replayed, run eagerly; graphs and layers cached now."""
    captures: int
    replays: int
    eager: int
    cached: int
    layers: int


def backend_flags() -> tuple:
    """The global switches that decide which cuBLAS / cuDNN kernels a call runs."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return (*conventions.precision_state(),
            matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction,
            getattr(matmul, "allow_fp16_accumulation", False), torch.backends.cuda.preferred_blas_library(),
            cudnn.enabled, cudnn.benchmark, cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)


_dtype = operator.attrgetter("dtype")


def _tensors(value) -> Sequence[Tensor]:
    return value if isinstance(value, (list, tuple)) else (value,)


def layer_identity(parameters: Sequence) -> tuple:
    """Addresses, shapes, strides and dtypes of the parameter arguments (tensors or lists)."""
    out = []
    for p in parameters:
        ts = () if p is None else _tensors(p)
        out.append((tuple(map(Tensor.data_ptr, ts)), tuple(map(Tensor.size, ts)),
                    tuple(map(Tensor.stride, ts)), tuple(map(_dtype, ts))))
    return tuple(out)


def _flat(values: list) -> list[Tensor]:
    """Tensors and lists of tensors, as one list of tensors."""
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(v)
        else:
            out.append(v)
    return out


def _static_like(a: Tensor) -> Tensor:
    """A graph's buffer for activation ``a``: its strides where it is contiguous
    or channels_last, else contiguous, the layout the eager op treats it as
    (a gapped or overlapping view's own strides would give its results another)."""
    if a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(a)
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


def _config_key(value):
    return tuple(value) if isinstance(value, list) else value


class CudaGraph:
    """One call captured on the GPU: the small interface the engine uses (the tests fake it).

    ``capture(fn, args)`` records ``fn(*args)`` on a side stream into a private memory pool
    and returns its (not yet written) outputs; ``launch`` replays it on the
    current stream; ``record_use`` marks the point after which nothing the
    caller issued reads the graph's memory, and ``busy`` says whether the device
    has not passed it yet.
    """

    _side_streams: dict[int, torch.cuda.Stream] = {}

    @staticmethod
    def stream_is_capturing() -> bool:
        return torch.cuda.is_current_stream_capturing()

    @staticmethod
    def current_stream() -> int:
        return torch.cuda.current_stream().cuda_stream

    def capture(self, fn: Callable, args: Sequence):
        device = torch.cuda.current_device()
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        stream = self._side_streams[device]
        self.graph, self.done = torch.cuda.CUDAGraph(), torch.cuda.Event()
        pool = torch.cuda.graph_pool_handle()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            error = None
            try:
                outputs = fn(*args)
            except Exception as exc:  # noqa: BLE001 - raised below, once the capture has ended
                error = exc
            try:
                self.graph.capture_end()
            except RuntimeError:
                # An invalidated capture raises before the allocator stops routing
                # this thread's allocations to the graph's pool.
                try:
                    torch._C._cuda_endAllocateToPool(device, pool)
                except RuntimeError:
                    pass  # it had stopped already
                if error is None:
                    raise
            if error is not None:
                raise error  # the cause, not the invalidated capture it led to
        torch.cuda.current_stream().wait_stream(stream)
        return outputs

    def launch(self) -> None:
        self.graph.replay()

    def record_use(self) -> None:
        self.done.record()

    def busy(self) -> bool:
        return not self.done.query()


class _Outputs:
    """Fresh tensors shaped like a graph's outputs: a tuple whose entries are
    tensors or lists of tensors. A list of contiguous tensors of one dtype is
    allocated as one buffer and split into views, so the host work per call
    does not grow with the list's length."""

    def __init__(self, outputs):
        self.graph_outputs = outputs
        self.flat: list[Tensor] = []
        self.packed: list[int | None] = []  # per entry: buffer length, or None
        for entry in outputs:
            if isinstance(entry, Tensor):
                self.flat.append(entry)
                self.packed.append(None)
                continue
            dtypes = {t.dtype for t in entry}
            contiguous = all(t.is_contiguous() for t in entry)
            self.packed.append(sum(t.numel() for t in entry) if len(dtypes) == 1 and contiguous else None)
            self.flat.extend(entry)

    def fresh(self) -> tuple[tuple, list[Tensor]]:
        structured, flat = [], []
        for entry, length in zip(self.graph_outputs, self.packed):
            if isinstance(entry, Tensor):
                out = torch.empty_like(entry)
                flat.append(out)
            else:
                if length is not None and entry:
                    buffer = torch.empty(length, dtype=entry[0].dtype, device=entry[0].device)
                    out = list(torch._C._nn.unflatten_dense_tensors(buffer, entry))
                else:
                    out = [torch.empty_like(t) for t in entry]
                flat.extend(out)
            structured.append(out)
        return tuple(structured), flat


class _Captured:
    """A graph with its static activations and its outputs."""

    def __init__(self, graph, statics: list[Tensor], outputs):
        self.graph, self.statics, self.outputs = graph, statics, _Outputs(outputs)


class _Layer:
    """The graphs of one layer identity in one pass, least recently used first."""

    def __init__(self, identity: tuple, parameters: list, on_free: Callable):
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.evicted: OrderedDict[tuple, None] = OrderedDict()
        self.recaptures = 0  # evicted keys captured again since the last replay
        self.identity = identity
        self.parameters = [None if p is None else [weakref.ref(t, on_free) for t in _tensors(p)]
                           for p in parameters]

    def alive(self) -> bool:
        """Whether its parameters still exist as they were: not freed, and not
        given new storage in place (``module.to()`` sets ``param.data``)."""
        parameters = []
        for refs in self.parameters:
            tensors = None if refs is None else [ref() for ref in refs]
            if tensors is not None and any(t is None for t in tensors):
                return False
            parameters.append(tensors)
        return layer_identity(parameters) == self.identity


# The roles of the layer ops' arguments, for both backends (the others are config).
# Under autocast the convolution weights arrive cast to the compute dtype, new
# tensors every call, while the BatchNorm parameters keep theirs: then the
# weights are activations of that call.
FORWARD_ROLES = dict(activations=("x",),
                     parameters=("conv_weight", "bn_weight", "bn_bias", "running_mean", "running_var"),
                     cast=("conv_weight", "bn_weight"))
BACKWARD_ROLES = dict(activations=("grad_y", "x", "y", "mean", "var"),
                      parameters=("conv_weight", "bn_weight", "bn_bias"),
                      cast=("conv_weight", "bn_weight"))

_LOCK = threading.RLock()  # one call at a time: captures share a side stream per device
_ABANDONED: list = []  # failed captures, kept: their pools may hold allocations
ENGINES: dict[str, GraphReplay] = {}  # the ops' engines, by name (gunn_ext.cuda_graphs.stats)


def register(engine: GraphReplay) -> GraphReplay:
    ENGINES[engine.name] = engine
    return engine


class GraphReplay:
    """``fn`` (an op's eager implementation) replayed as CUDA graphs (see the module doc).

    ``arguments`` are the op's argument names in order; ``activations`` and
    ``parameters`` name the arguments of those roles (a tensor or a list of
    tensors each), all others are config. ``cast=(a, b)`` names a parameter
    ``a`` that is an activation in the calls where its dtype differs from
    parameter ``b``'s: a per-call cast. Calling the engine with the op's
    arguments returns ``fn``'s results.
    """

    def __init__(self, name: str, fn: Callable, arguments: Sequence[str], *, activations: Sequence[str],
                 parameters: Sequence[str], cast: tuple[str, str] | None = None,
                 graph_type: type = CudaGraph, device_type: str = "cuda", capacity: int | None = None):
        names = list(arguments)
        unknown = [n for n in (*activations, *parameters, *(cast or ())) if n not in names]
        if unknown or not activations or (cast and not set(cast) <= set(parameters)):
            raise ValueError(f"activations, parameters and cast must name arguments of {name} {names} "
                             f"(at least one activation; cast two parameters), got unknown {unknown}")
        self.name, self.fn, self.graph_type, self.device_type = name, fn, graph_type, device_type
        self.roles = ([names.index(n) for n in activations], [names.index(n) for n in parameters])
        self.cast = None if cast is None else tuple(names.index(n) for n in cast)
        if self.cast is not None:
            cast_slot = self.cast[0]
            self.cast_roles = (self.roles[0] + [cast_slot], [i for i in self.roles[1] if i != cast_slot])
        self.config_slots = [i for i, n in enumerate(names) if n not in activations and n not in parameters]
        self.capacity = CAPACITY if capacity is None else capacity
        self.layers: OrderedDict[tuple, _Layer] = OrderedDict()
        self.retired: list[_Captured] = []  # dropped graphs whose last replay may still be running
        self.freed = False  # a cached layer's parameter was freed since the last check
        self.counts = {"captures": 0, "replays": 0, "eager": 0}
        self.warned_thrash = False

    def stats(self) -> Counts:
        with _LOCK:
            self._drop_dead_layers()
            return Counts(**self.counts, cached=sum(len(layer.graphs) for layer in self.layers.values()),
                          layers=len(self.layers))

    def clear(self) -> None:
        with _LOCK:
            for layer in self.layers.values():
                self.retired += layer.graphs.values()
            self.layers.clear()
            self._prune_retired()
            self.counts = dict.fromkeys(self.counts, 0)
            self.warned_thrash = False

    def __call__(self, *args):
        x = args[self.roles[0][0]]
        on_gpu = self.device_type == "cuda" and isinstance(x, Tensor) and x.device.type == "cuda"
        with torch.cuda.device(x.device) if on_gpu else contextlib.nullcontext():
            if not self._eligible(x):
                self.counts["eager"] += 1
                return self.fn(*args)
            with _LOCK:
                return self._run(args)

    def _eligible(self, x) -> bool:
        if not _enabled or self.capacity == 0:
            return False
        if not isinstance(x, Tensor) or x.device.type != self.device_type:
            return False
        return not self.graph_type.stream_is_capturing()

    def _run(self, args: tuple):
        self._drop_dead_layers()
        activation_slots, parameter_slots = self._roles(args)
        activations = _flat([args[i] for i in activation_slots])
        parameters = [args[i] for i in parameter_slots]
        identity = layer_identity(parameters)
        layer = self.layers.get(identity)
        if layer is None:
            layer = self._new_layer(identity, parameters)
        else:
            self.layers.move_to_end(identity)
        key = (self.graph_type.current_stream(), backend_flags(), tuple(activation_slots),
               tuple((a.shape, a.stride(), a.dtype, a.device) for a in activations),
               tuple(_config_key(args[i]) for i in self.config_slots))
        entry = layer.graphs.get(key)
        if entry is not None:
            layer.graphs.move_to_end(key)
            layer.recaptures = 0
            return self._replay(entry, activations)
        if key in layer.evicted:
            del layer.evicted[key]
            layer.recaptures += 1
            if layer.recaptures > self.capacity and not self.warned_thrash:
                self.warned_thrash = True
                warnings.warn(f"gunn_ext: a layer's {self.name} calls cycle through more than "
                              f"{self.capacity} CUDA graphs, so they are captured again and again; "
                              f"raise GUNN_EXT_CUDA_GRAPHS_CACHE", RuntimeWarning, stacklevel=4)
        return self._capture(layer, key, args, activation_slots, activations)

    def _roles(self, args: tuple) -> tuple[list[int], list[int]]:
        """Slots of this call's activations and parameters."""
        if self.cast is not None:
            a, b = (_tensors(args[i]) for i in self.cast)
            if a and b and a[0].dtype != b[0].dtype:
                return self.cast_roles
        return self.roles

    def _new_layer(self, identity: tuple, parameters: list) -> _Layer:
        self.freed = True  # a new layer may be an old one's parameters given new storage in place
        self._drop_dead_layers()
        layer = self.layers[identity] = _Layer(identity, parameters, self._parameter_freed)
        return layer

    def _parameter_freed(self, _ref) -> None:
        # A weakref callback runs wherever the last reference goes, even inside
        # a call of this engine: it only flags, the next call or stats() drops.
        self.freed = True

    def _drop_dead_layers(self) -> None:
        """Retires the graphs of layers whose parameters were freed or moved,
        then frees the retired graphs that no replay still uses."""
        if self.freed:
            self.freed = False
            for dead in [i for i, layer in self.layers.items() if not layer.alive()]:
                self.retired += self.layers.pop(dead).graphs.values()
        self._prune_retired()

    def _prune_retired(self) -> None:
        """Frees the dropped graphs that no replay still uses."""
        self.retired = [entry for entry in self.retired if entry.graph.busy()]

    def _capture(self, layer: _Layer, key: tuple, args: tuple, slots: list[int], activations: list[Tensor]):
        with torch.inference_mode(False):  # replays copy into them outside inference mode too
            statics = [_static_like(a) for a in activations]
        torch._foreach_copy_(statics, activations)
        static_args, rest = list(args), iter(statics)
        for slot in slots:
            value = args[slot]
            static_args[slot] = [next(rest) for _ in value] if isinstance(value, list) else next(rest)
        result = self.fn(*static_args)  # the warm-up, outside the capture, is this call's result
        graph = self.graph_type()
        try:
            outputs = graph.capture(self.fn, static_args)
        except Exception as exc:  # noqa: BLE001 - any failed capture turns replay off
            _ABANDONED.append(graph)
            set_enabled(False)
            self.counts["eager"] += 1
            warnings.warn(f"gunn_ext: capturing a CUDA graph of {self.name} failed ({exc}); CUDA graph "
                          f"replay is off for this process (gunn_ext.cuda_graphs.set_enabled(True) "
                          f"turns it back on)", RuntimeWarning, stacklevel=4)
            return result
        self.counts["captures"] += 1
        layer.graphs[key] = _Captured(graph, statics, outputs)
        while len(layer.graphs) > self.capacity:
            old_key, old = layer.graphs.popitem(last=False)
            self.retired.append(old)
            layer.evicted[old_key] = None
            while len(layer.evicted) > 4 * self.capacity:
                layer.evicted.popitem(last=False)
        return result

    def _replay(self, entry: _Captured, activations: list[Tensor]):
        torch._foreach_copy_(entry.statics, activations)
        entry.graph.launch()
        structured, flat = entry.outputs.fresh()
        torch._foreach_copy_(flat, entry.outputs.flat)
        entry.graph.record_use()
        self.counts["replays"] += 1
        return structured
