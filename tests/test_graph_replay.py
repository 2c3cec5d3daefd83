"""The CUDA graph replay engine (:mod:`gunn_ext.graph_replay`), on the CPU.

A CUDA graph is stood in for by ``RecordingGraph``: its capture leaves the
outputs unwritten (NaN), as a real capture does, and each replay reruns the
recorded call into them. Like a real graph it reads every tensor at the
address it had at capture: a replay after a tensor moved fails the test. The
real graphs are tested on the GPU in ``test_cuda.py`` and by
``benchmarks/replay_loop.py``.
"""
import os
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

from conftest import make_layer
from gunn_ext import cuda_graphs, graph_replay, ops

NAN = float("nan")
ROOT = Path(__file__).resolve().parents[1]


class RecordingGraph:
    running = False  # whether the device would still be running the last replay
    capturing = False  # whether the current stream is capturing (a user's graph)
    stream = 0  # the current stream

    @staticmethod
    def stream_is_capturing():
        return RecordingGraph.capturing

    @staticmethod
    def current_stream():
        return RecordingGraph.stream

    def capture(self, fn, args):
        # Weak references: a graph keeps no tensor alive, it only remembers addresses.
        self.fn, self.args = fn, pytree.tree_map_only(torch.Tensor, weakref.ref, list(args))
        self.addresses = [(weakref.ref(t), t.data_ptr()) for t in pytree.tree_leaves(list(args))
                          if isinstance(t, torch.Tensor)]
        self.outputs = fn(*args)
        for t in pytree.tree_leaves(self.outputs):
            t.fill_(NAN)
        return self.outputs

    def launch(self):
        for ref, address in self.addresses:
            assert ref() is not None, "a replay would read freed memory"
            assert ref().data_ptr() == address, "a replay would read a tensor that has moved"
        args = pytree.tree_map_only(weakref.ref, lambda ref: ref(), self.args)
        # A replay writes the graph's memory below autograd, whatever mode the capture ran in.
        with torch.inference_mode():
            for static, value in zip(pytree.tree_leaves(self.outputs), pytree.tree_leaves(self.fn(*args))):
                static.copy_(value)

    def record_use(self):
        pass

    def busy(self):
        return RecordingGraph.running


class FailingGraph(RecordingGraph):
    def capture(self, fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(autouse=True)
def _fresh_switch():
    previous = graph_replay.set_enabled(True)
    yield
    graph_replay.set_enabled(previous)
    RecordingGraph.capturing, RecordingGraph.stream, RecordingGraph.running = False, 0, False


def op(x, ws, scale):
    """A stand-in op with the backward's output structure: a tensor and a list."""
    return x * scale, [w * x.sum() for w in ws]


def engine(fn=op, **kwargs):
    calls = []

    def counted(*args):
        calls.append(args)
        return fn(*args)
    kwargs.setdefault("graph_type", RecordingGraph)
    replay = graph_replay.GraphReplay("test", counted, ["x", "ws", "scale"], activations=["x"],
                                      parameters=["ws"], device_type="cpu", **kwargs)
    return replay, calls


def leaves(result):
    return pytree.tree_leaves(result)


def same(a, b):
    return all(torch.equal(u, v) for u, v in zip(leaves(a), leaves(b))) and len(leaves(a)) == len(leaves(b))


def test_capture_at_first_sight_then_replay_with_moving_activations():
    replay, calls = engine()
    ws = [torch.randn(2), torch.randn(5)]
    results = []
    for _ in range(4):
        x = torch.randn(3, 4)  # a fresh activation each call, wherever the allocator puts it
        results.append((replay(x, ws, 2.0), x))
        assert same(results[-1][0], op(x, ws, 2.0))
    assert replay.stats() == graph_replay.Counts(captures=1, replays=3, eager=0, cached=1, layers=1)
    assert len(calls) == 2 + 3  # warm-up and capture, then one run per (recorded) replay
    pointers = [t.data_ptr() for result, _ in results for t in leaves(result)]
    assert len(set(pointers)) == len(pointers), "two calls share an output tensor"


def test_list_outputs_come_in_one_buffer_per_list():
    replay, _ = engine()
    ws = [torch.randn(2, 3), torch.randn(5)]
    replay(torch.randn(3), ws, 1.0)
    y, grads = replay(torch.randn(3), ws, 1.0)
    assert replay.stats().replays == 1
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 1
    assert y.untyped_storage().data_ptr() != grads[0].untyped_storage().data_ptr()
    assert [g.shape for g in grads] == [w.shape for w in ws]


def test_parameters_updated_in_place_keep_replaying():
    replay, _ = engine()
    ws = [torch.randn(2)]
    for _ in range(5):
        with torch.no_grad():
            ws[0].add_(0.5)
        x = torch.randn(3, 4)
        assert same(replay(x, ws, 0.5), op(x, ws, 0.5))
    assert replay.stats().captures == 1 and replay.stats().replays == 4


@torch.no_grad()  # as below the autograd dispatch key, where the ops call the engine
def test_replaced_parameters_recapture_and_dead_layers_are_dropped():
    layer = make_layer(channels=6, segments=2)
    replay = native_engine("forward", capacity=8)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    replay(*ops.layer_arguments(layer, x, True))
    replay(*ops.layer_arguments(layer, x, True))
    state = {k: v.clone() + 0.25 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)  # new tensors, the old ones freed
    args = ops.layer_arguments(layer, x, True)
    assert same(replay(*args), torch.ops.gunn_ext.gradual_update(*args))
    flat = layer.units.conv_weight
    flat.data = torch.randn_like(flat)  # the same Parameter, new memory
    args = ops.layer_arguments(layer, x, True)
    assert same(replay(*args), torch.ops.gunn_ext.gradual_update(*args))
    stats = replay.stats()
    assert (stats.captures, stats.replays) == (3, 1), stats
    assert stats.layers == 1, "the layers of freed or moved parameters are still cached"


def test_graphs_of_a_deleted_layer_are_dropped_at_the_next_call():
    """Deleting a model frees its graphs at the engine's next call, also when
    that call is another layer's that is already cached (no new layer)."""
    kept, gone = make_layer(channels=6, segments=2), make_layer(channels=6, segments=3)
    replay = native_engine("forward", capacity=8)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        for layer in (kept, gone, kept):
            replay(*ops.layer_arguments(layer, x, True))
        assert replay.stats().layers == 2
        graphs = [weakref.ref(entry.graph) for layer in replay.layers.values() for entry in layer.graphs.values()]
        del gone
        args = ops.layer_arguments(kept, x, True)
        assert same(replay(*args), torch.ops.gunn_ext.gradual_update(*args))
    # Before stats(), which drops dead layers too: the call itself dropped it.
    assert len(replay.layers) == 1, "the deleted layer is still cached after the next call"
    assert sum(ref() is not None for ref in graphs) == 1, "the deleted layer's graph is still held"
    stats = replay.stats()
    assert (stats.layers, stats.cached, stats.captures, stats.replays) == (1, 1, 2, 2), stats


def test_precision_switches_set_through_either_api():
    """PyTorch's fp32_precision switches, set to values its legacy getters
    refuse to read (matmuls in TF32, convolutions in IEEE), are read and keyed;
    float32_products sets and restores them."""
    from gunn_ext import conventions
    from gunn_ext.graph_replay import backend_flags

    if conventions._fp32_switches() is None:
        pytest.skip("this torch has no fp32_precision switches")
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = [switch.fp32_precision for switch in conventions._fp32_switches()]
    try:
        matmul.fp32_precision, conv.fp32_precision = "tf32", "ieee"
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()  # the legacy getter refuses
        flags = backend_flags()
        assert conventions.matmul_tf32()
        with conventions.float32_products(False):
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
            assert not conventions.matmul_tf32() and backend_flags() != flags
        assert backend_flags() == flags and (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "ieee")
    finally:
        for switch, value in zip(conventions._fp32_switches(), saved):
            switch.fp32_precision = value


def test_key_has_shapes_strides_dtypes_config_flags_and_stream():
    replay, _ = engine()
    ws = [torch.randn(2)]
    x = torch.randn(4, 6)
    replay(x, ws, 1.0)
    variants = [(x[:2], ws, 1.0), (x.t(), ws, 1.0), (x.double(), [ws[0].double()], 1.0), (x, ws, 3.0)]
    for args in variants:
        assert same(replay(*args), op(*args))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "highest" else "highest")
    try:
        replay(x, ws, 1.0)
    finally:
        torch.set_float32_matmul_precision(precision)
    RecordingGraph.stream = 7
    replay(x, ws, 1.0)
    assert replay.stats().captures == 1 + len(variants) + 2 and replay.stats().replays == 0
    RecordingGraph.stream = 0
    replay(x.clone(), ws, 1.0)
    assert replay.stats().replays == 1


def test_eviction_then_recapture_and_a_warning_when_a_layer_cycles():
    replay, _ = engine(capacity=1)
    ws = [torch.randn(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            for shape in ((2, 2), (3, 3)):
                x = torch.randn(shape)
                assert same(replay(x, ws, 1.5), op(x, ws, 1.5))
    stats = replay.stats()
    assert (stats.captures, stats.replays, stats.eager, stats.cached) == (8, 0, 0, 1)
    assert [str(w.message) for w in caught if "GUNN_EXT_CUDA_GRAPHS_CACHE" in str(w.message)] != []
    assert len(caught) == 1, "the cycling warning comes once"


def test_dropped_graphs_live_until_their_last_replay_is_done():
    replay, _ = engine(capacity=1)
    ws = [torch.randn(2)]
    RecordingGraph.running = True
    for shape in ((2, 2), (2, 2), (3, 3)):  # captured, replayed, evicted by the second capture
        replay(torch.randn(shape), ws, 1.0)
    assert len(replay.retired) == 1
    replay.clear()
    assert len(replay.retired) == 2 and replay.stats().cached == 0
    RecordingGraph.running = False
    replay(torch.randn(2, 2), ws, 1.0)
    assert replay.retired == []


def test_failed_capture_is_reported_once_and_turns_replay_off():
    failing, _ = engine(graph_type=FailingGraph)
    other, _ = engine()
    x, ws = torch.randn(2, 2), [torch.randn(2)]
    with pytest.warns(RuntimeWarning, match=r"capturing a CUDA graph of test failed \(operation not "
                                            r"permitted.*replay is off for this process"):
        assert same(failing(x, ws, 1.0), op(x, ws, 1.0))
    assert not cuda_graphs.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for replay in (failing, other, failing):
            assert same(replay(x, ws, 1.0), op(x, ws, 1.0))
    assert failing.stats().eager == 3 and failing.stats().captures == 0
    assert other.stats().eager == 1 and other.stats().captures == 0


def test_calls_inside_a_user_capture_run_eagerly():
    replay, calls = engine()
    x, ws = torch.randn(2, 2), [torch.randn(2)]
    RecordingGraph.capturing = True
    for _ in range(3):
        assert same(replay(x, ws, 1.0), op(x, ws, 1.0))
    assert replay.stats() == graph_replay.Counts(captures=0, replays=0, eager=3, cached=0, layers=0)
    assert len(calls) == 3


def test_switched_off_capacity_zero_and_other_devices_run_eagerly():
    replay, _ = engine()
    no_cache, _ = engine(capacity=0)
    cuda_only = graph_replay.GraphReplay("test", op, ["x", "ws", "scale"], activations=["x"],
                                         parameters=["ws"], graph_type=RecordingGraph)
    x, ws = torch.randn(2, 2), [torch.randn(2)]
    with cuda_graphs.disabled():
        assert not cuda_graphs.enabled()
        replay(x, ws, 1.0)
    assert cuda_graphs.enabled()
    no_cache(x, ws, 1.0)
    cuda_only(x, ws, 1.0)
    assert all(e.stats().eager == 1 and e.stats().captures == 0 for e in (replay, no_cache, cuda_only))


def scaled_op(x, ws, gs, scale):
    """A stand-in op whose weights ``ws`` may come cast, per call, to another dtype than ``gs``."""
    return x * scale, [(w * x.sum()).to(g.dtype) * g for w, g in zip(ws, gs)]


def test_parameters_cast_per_call_are_copied_in_like_activations():
    replay = graph_replay.GraphReplay("test", scaled_op, ["x", "ws", "gs", "scale"], activations=["x"],
                                      parameters=["ws", "gs"], cast=("ws", "gs"),
                                      graph_type=RecordingGraph, device_type="cpu")
    ws, gs = [torch.randn(3, dtype=torch.float64)], [torch.randn(3, dtype=torch.float64)]
    kept = []
    for step in range(4):
        with torch.no_grad():
            ws[0].add_(0.5)
        casts = [w.float() for w in ws]  # autocast's per-call copies, wherever they land
        kept.append(torch.empty(3))
        x = torch.randn(3)
        assert same(replay(x, casts, gs, 2.0), scaled_op(x, casts, gs, 2.0)), f"step {step}"
    for _ in range(2):  # uncast: the weights are parameters, read in place
        x = torch.randn(3)
        assert same(replay(x, ws, gs, 2.0), scaled_op(x, ws, gs, 2.0))
    stats = replay.stats()
    assert (stats.captures, stats.replays, stats.layers) == (2, 4, 2), stats


@pytest.mark.parametrize("value,expected", [(None, True), ("", True), ("1", True), ("on", True),
                                            ("Yes", True), ("TRUE", True), ("0", False), ("False", False),
                                            ("OFF", False), ("no", False), (" off ", False)])
def test_switch_parsing(value, expected):
    assert graph_replay.parse_switch("GUNN_EXT_CUDA_GRAPHS", value, True) is expected


def test_bad_switch_and_cache_size_name_the_variable():
    with pytest.raises(ValueError, match=r"GUNN_EXT_CUDA_GRAPHS must be one of 1/true/on/yes or "
                                         r"0/false/off/no \(any case\), got 'maybe'"):
        graph_replay.parse_switch("GUNN_EXT_CUDA_GRAPHS", "maybe", True)
    with pytest.raises(ValueError, match="GUNN_EXT_CUDA_GRAPHS_CACHE must be a non-negative integer"):
        graph_replay.parse_capacity("GUNN_EXT_CUDA_GRAPHS_CACHE", "many", 8)
    assert graph_replay.parse_capacity("GUNN_EXT_CUDA_GRAPHS_CACHE", "3", 8) == 3


def test_environment_switch_is_read_at_import():
    env = dict(os.environ, GUNN_EXT_CUDA_GRAPHS="False", GUNN_EXT_CUDA_GRAPHS_CACHE="3")
    out = subprocess.run([sys.executable, "-c", "from gunn_ext import cuda_graphs, graph_replay; "
                          "print(cuda_graphs.enabled(), graph_replay.CAPACITY)"],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "3"]


def test_roles_must_name_arguments():
    with pytest.raises(ValueError, match=r"must name arguments of test.*unknown \['w'\]"):
        graph_replay.GraphReplay("test", op, ["x", "ws"], activations=["x"], parameters=["w"])


def test_one_api_reports_every_registered_engine():
    replay, _ = engine()
    graph_replay.register(replay)
    try:
        replay(torch.randn(2), [torch.randn(2)], 1.0)
        assert cuda_graphs.stats()["test"].captures == 1
        cuda_graphs.clear()
        assert cuda_graphs.stats()["test"] == graph_replay.Counts(0, 0, 0, 0, 0)
    finally:
        del graph_replay.ENGINES["test"]


@pytest.mark.skipif(not ops.has_cuda_kernels(), reason="the extension was built without CUDA kernels")
def test_native_cuda_kernels_go_through_the_engine():
    for public, eager in (("gradual_update", "_gradual_update_cuda"),
                          ("gradual_update_backward", "_gradual_update_backward_cuda")):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gunn_ext::{public}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gunn_ext::{eager}", "CUDA")
        signatures = [str(s)[len(s.name):] for s in
                      (getattr(torch.ops.gunn_ext, name).default._schema for name in (public, eager))]
        assert signatures[0] == signatures[1]
    assert {"native_forward", "native_backward"} <= set(cuda_graphs.stats())


def native_engine(which, **kwargs):
    """The native CPU op through the engine, with the layer ops' argument roles (call it
    under ``no_grad``: the real kernels run below autograd)."""
    op_ = getattr(torch.ops.gunn_ext, "gradual_update" if which == "forward" else "gradual_update_backward")
    roles = graph_replay.FORWARD_ROLES if which == "forward" else graph_replay.BACKWARD_ROLES
    return graph_replay.GraphReplay(which, op_.default, [a.name for a in op_.default._schema.arguments],
                                    graph_type=RecordingGraph, device_type="cpu", **roles, **kwargs)


@torch.no_grad()
def test_replays_keep_the_eager_layout_of_a_gapped_input():
    """A view with gaps (channels 0-5 of a channels_last batch of 12) is not
    channels_last-contiguous, so the eager op gives a contiguous output: so
    do the capture and the replay, whose buffer is not a channels_last copy."""
    layer = make_layer(channels=6, segments=2)
    forward = native_engine("forward")
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)[:, :6]
    args = ops.layer_arguments(layer, x, True)
    eager = torch.ops.gunn_ext.gradual_update(*args)[0]
    captured, replayed = forward(*args)[0], forward(*args)[0]
    assert forward.stats().replays == 1
    assert captured.stride() == replayed.stride() == eager.stride() and torch.equal(replayed, eager)


@torch.no_grad()
def test_a_graph_captured_in_inference_mode_replays_outside_it():
    """An evaluation under torch.inference_mode (as some validation loops run
    it), then the same call under no_grad: the graph's buffers are ordinary
    tensors, so the replay can copy into them."""
    layer = make_layer(channels=6, segments=2).eval()
    forward = native_engine("forward")
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    with torch.inference_mode():
        forward(*ops.layer_arguments(layer, x, False))
    args = ops.layer_arguments(layer, x, False)
    y = forward(*args)[0]
    assert forward.stats().replays == 1 and torch.equal(y, torch.ops.gunn_ext.gradual_update(*args)[0])


@torch.no_grad()
def test_graphs_of_parameters_moved_in_place_are_freed():
    """module.to() gives the same Parameter objects new storage (param.data = ...):
    the graphs of the old storage are dropped when a new layer is seen, and
    clear() frees every graph no replay still uses at once."""
    layer = make_layer(channels=6, segments=2)
    forward = native_engine("forward")
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    for _ in range(4):
        forward(*ops.layer_arguments(layer, x, True))
        layer.float()
        layer.double()
    assert forward.stats().layers == 1 and forward.retired == []
    forward.clear()
    assert forward.retired == []


# A GUNN-15 run in miniature: three layers at three resolutions, training
# batches with a smaller last one, evaluation batches in between.
GUNN15 = [dict(channels=8, segments=4, size=4), dict(channels=10, segments=5, size=2),
          dict(channels=12, segments=6, size=1)]
TRAIN_BATCHES, EVAL_BATCHES, EPOCHS = (4, 4, 2), (4, 3), 5


@torch.no_grad()  # as below the autograd dispatch key, where the ops call the engine
def test_simulated_gunn15_run_replays_every_call_from_the_second_epoch():
    forward, backward = native_engine("forward"), native_engine("backward")
    layers = [make_layer(channels=c["channels"], segments=c["segments"], seed=k)
              for k, c in enumerate(GUNN15)]
    kept = []  # tensors kept alive for a while, so activations land at ever new addresses

    def fresh(*shape):
        kept.append(torch.randn(*shape, dtype=torch.float64))
        del kept[:-7]
        return torch.randn(*shape, dtype=torch.float64)

    def step(layer, spec, batch, training):
        layer.train(training)
        x = fresh(batch, spec["channels"], spec["size"], spec["size"])
        args = ops.layer_arguments(layer, x, training)
        y, mean, var = result = forward(*args)
        assert same(result, torch.ops.gunn_ext.gradual_update(*args)), "replayed forward != eager"
        if not training:
            return
        x, convs, weights, biases, _, _, *config = args
        backward_args = (fresh(*y.shape), x, y, convs, weights, biases, mean, var, *config)
        grads = backward(*backward_args)
        eager = torch.ops.gunn_ext.gradual_update_backward(*backward_args)
        assert same(grads, eager), "replayed backward != eager"
        with torch.no_grad():  # SGD in place, and the running statistics
            torch._foreach_add_([convs, weights, biases], list(grads[1:]), alpha=-0.01)
        ops.update_running_stats(layer.units, mean, var, batch * spec["size"] ** 2)

    for epoch in range(EPOCHS):
        if epoch == 1:
            after_first = {name: e.stats() for name, e in (("forward", forward), ("backward", backward))}
        for batch in TRAIN_BATCHES:
            for layer, spec in zip(layers, GUNN15):
                step(layer, spec, batch, training=True)
        for batch in EVAL_BATCHES:
            for layer, spec in zip(layers, GUNN15):
                step(layer, spec, batch, training=False)
    calls = {"forward": EPOCHS * len(GUNN15) * (len(TRAIN_BATCHES) + len(EVAL_BATCHES)),
             "backward": EPOCHS * len(GUNN15) * len(TRAIN_BATCHES)}
    for name, e in (("forward", forward), ("backward", backward)):
        first, end = after_first[name], e.stats()
        assert end.captures == first.captures and end.eager == first.eager == 0, (name, first, end)
        assert end.replays - first.replays == calls[name] * (EPOCHS - 1) // EPOCHS, (name, first, end)
        assert end.captures + end.replays == calls[name]
    assert forward.stats().captures == 3 * 4  # per layer: train full and last batch, eval full and last
    assert backward.stats().captures == 3 * 2
