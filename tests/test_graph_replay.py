"""The replay policy of :mod:`gunn_ext.graph_replay`, on the CPU.

A CUDA graph is stood in for by ``RecordingGraph``: its capture leaves the
outputs unwritten (NaN), as a real capture does, and each replay reruns the
recorded call into them. The real graphs are tested on the GPU in
``test_triton.py``.
"""
import warnings

import pytest
import torch

from gunn_ext import cuda_graphs, graph_replay


class RecordingGraph:
    running = False  # whether the device would still be running the last replay

    def capture(self, fn, args):
        self.fn, self.args = fn, args
        self.outputs = fn(*args)
        for t in torch.utils._pytree.tree_leaves(self.outputs):
            t.fill_(float("nan"))
        return self.outputs

    def launch(self):
        fresh = self.fn(*self.args)
        for static, value in zip(torch.utils._pytree.tree_leaves(self.outputs),
                                 torch.utils._pytree.tree_leaves(fresh)):
            static.copy_(value)

    def record_use(self):
        pass

    def busy(self):
        return RecordingGraph.running


class FailingGraph:
    def capture(self, fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")


def op(x, ws, scale):
    """A stand-in op with the triton backward's output structure."""
    return x * scale, [w + x.sum() for w in ws]


def replayer(**kwargs):
    calls = []

    def fn(*args):
        calls.append(args)
        return op(*args)
    kwargs.setdefault("graph_type", RecordingGraph)
    return graph_replay.GraphReplay(fn, device_type="cpu", **kwargs), calls


def leaves(result):
    return torch.utils._pytree.tree_leaves(result)


def test_eager_then_capture_then_replay():
    replay, calls = replayer()
    x, ws = torch.randn(3, 4), [torch.randn(2), torch.randn(5)]
    results = [replay(x, ws, 2.0) for _ in range(4)]
    assert replay.stats() == graph_replay.Counts(captures=1, replays=3, eager=1, cached=1)
    expected = leaves(op(x, ws, 2.0))
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(leaves(result), expected))
    pointers = [t.data_ptr() for result in results for t in leaves(result)]
    assert len(set(pointers)) == len(pointers), "two calls share an output tensor"
    assert len(calls) == 1 + 1 + 3  # eager, capture, replays


def test_replay_reads_current_values():
    replay, _ = replayer()
    x, ws = torch.randn(3, 4), [torch.randn(2)]
    for _ in range(4):
        x.normal_()
        ws[0].normal_()
        y, (w,) = replay(x, ws, 0.5)
        assert torch.equal(y, x * 0.5) and torch.equal(w, ws[0] + x.sum())
    assert replay.stats().replays == 3


def test_signature_covers_shapes_pointers_and_scalars():
    replay, _ = replayer()
    x, ws = torch.randn(3, 4), [torch.randn(2)]
    replay(x, ws, 1.0)
    replay(x, ws, 1.0)
    for args in ((x, ws, 3.0), (x.clone(), ws, 1.0), (x[:2], ws, 1.0), (x.t(), ws, 1.0),
                 (x, [ws[0], ws[0]], 1.0), (x.double(), ws, 1.0)):
        result = replay(*args)
        assert all(torch.equal(a, b) for a, b in zip(leaves(result), leaves(op(*args))))
    assert replay.stats().captures == 1 and replay.stats().eager == 7


def test_eviction_and_capture_limit():
    replay, _ = replayer(capacity=1)
    a, b = torch.randn(2, 2), torch.randn(3, 3)
    for _ in range(8):
        for x in (a, b):
            y, _ = replay(x, [], 1.5)
            assert torch.equal(y, x * 1.5)
    stats = replay.stats()
    assert stats.captures == 2 * graph_replay.MAX_CAPTURES and stats.cached == 1
    assert stats.eager + stats.replays == 16  # a capture replays too


def test_dropped_graphs_live_until_their_last_replay_is_done(monkeypatch):
    replay, _ = replayer(capacity=1)
    a, b = torch.randn(2, 2), torch.randn(3, 3)
    monkeypatch.setattr(RecordingGraph, "running", True)
    for x in (a, a, b, b):  # a is captured, then evicted by b's capture
        replay(x, [], 1.0)
    assert len(replay.retired) == 1
    replay.clear()
    assert len(replay.retired) == 2
    monkeypatch.setattr(RecordingGraph, "running", False)
    replay(a, [], 1.0)
    assert replay.retired == []


def test_switched_off():
    replay, _ = replayer()
    x = torch.randn(2, 2)
    with cuda_graphs.disabled():
        assert not cuda_graphs.enabled()
        for _ in range(3):
            replay(x, [], 1.0)
    assert cuda_graphs.enabled()
    assert replay.stats() == graph_replay.Counts(captures=0, replays=0, eager=3, cached=0)


def test_failed_capture_falls_back_to_eager():
    replay, _ = replayer(graph_type=FailingGraph)
    x = torch.randn(2, 2)
    replay(x, [], 1.0)
    with pytest.warns(RuntimeWarning, match="capture failed.*eagerly"):
        y, _ = replay(x, [], 1.0)
    assert torch.equal(y, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay(x, [], 1.0)
    assert replay.stats().eager == 3 and replay.stats().captures == 0


def test_capacity_zero_and_other_devices_run_eagerly():
    replay, _ = replayer(capacity=0)
    x = torch.randn(2, 2)
    for _ in range(3):
        replay(x, [], 1.0)
    cuda_only = graph_replay.GraphReplay(lambda *a: op(*a), graph_type=RecordingGraph)
    for _ in range(3):
        cuda_only(x, [], 1.0)
    assert replay.stats().eager == 3 and cuda_only.stats().eager == 3


def test_bad_cache_size(monkeypatch):
    monkeypatch.setenv("GUNN_EXT_CUDA_GRAPHS_CACHE", "many")
    with pytest.raises(ValueError, match="GUNN_EXT_CUDA_GRAPHS_CACHE must be a non-negative integer"):
        graph_replay.GraphReplay(lambda: None)
