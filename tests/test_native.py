"""The compiled ``native`` backend against the pure-PyTorch reference."""
import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (DEVICES, LAYER_CASES, assert_close, check_against_truth, forward_backward, make_layer,
                      relative_error, run_and_compare, twin)
from gunn_ext import GUNNLayer, ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gunn", "sunn"])
@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("shortcut", [True, False], ids=["shortcut", "plain"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_reference_float64(device, kind, case, shortcut, train):
    layer = make_layer(kind, shortcut=shortcut, device=device, **LAYER_CASES[case])
    x = torch.randn(2, layer.channels, 7, 5, dtype=torch.float64, device=device)
    run_and_compare(layer, twin(layer, "native"), x, train=train, steps=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gunn", "sunn"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_reference_float32(device, kind, train):
    layer = make_layer(kind, channels=24, segments=[8, 4, 12], dtype=torch.float32, device=device)
    x = torch.randn(3, 24, 6, 9, device=device)
    run_and_compare(layer, twin(layer, "native"), x, train=train, steps=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided", "batch_1", "1x1"])
def test_layouts_and_odd_shapes(device, layout):
    layer = make_layer(channels=9, segments=[4, 5], device=device)
    if layout == "channels_last":
        x = torch.randn(2, 9, 5, 3, dtype=torch.float64, device=device).to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(4, 18, 7, 10, dtype=torch.float64, device=device)[::2, 1::2, :, ::2]
        assert not x.is_contiguous()
    elif layout == "batch_1":
        x = torch.randn(1, 9, 3, 7, dtype=torch.float64, device=device)
    else:
        x = torch.randn(5, 9, 1, 1, dtype=torch.float64, device=device)
    native = twin(layer, "native")
    run_and_compare(layer, native, x, train=True)
    run_and_compare(layer, native, x, train=False)


@pytest.mark.parametrize("device", DEVICES)
def test_output_layout_follows_input(device):
    layer = make_layer(channels=6, segments=2, backend="native", device=device)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64, device=device)
    assert layer(x).is_contiguous()
    y = layer(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_layers_match_reference(data):
    channels = data.draw(st.integers(1, 10), label="channels")
    sizes, left = [], channels
    while left:
        sizes.append(data.draw(st.integers(1, left), label="segment"))
        left -= sizes[-1]
    layer = make_layer(
        data.draw(st.sampled_from(["gunn", "sunn"]), label="kind"),
        channels=channels, segments=sizes,
        expansion=data.draw(st.integers(1, 3), label="expansion"),
        bottlenecks=data.draw(st.integers(1, 2), label="bottlenecks"),
        shortcut=data.draw(st.booleans(), label="shortcut"),
        seed=data.draw(st.integers(0, 2**16), label="seed"))
    batch = data.draw(st.integers(1, 3), label="batch")
    h, w = data.draw(st.integers(1, 6), label="h"), data.draw(st.integers(1, 6), label="w")
    train = data.draw(st.booleans(), label="train") and batch * h * w > 1
    x = torch.randn(batch, channels, h, w, dtype=torch.float64)
    run_and_compare(layer, twin(layer, "native"), x, train=train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck(train):
    layer = make_layer(channels=3, segments=[1, 2], expansion=1, bottlenecks=2, backend="native")
    layer.train(train)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def _sample_op_args(training):
    layer = make_layer(channels=6, segments=[2, 4], bottlenecks=2)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    return ops.layer_arguments(layer, x, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(training):
    from gunn_ext import ops
    args = _sample_op_args(training)
    ops.gradual_update(*args)  # registers the Python parts
    for t in args[1:4]:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.gunn_ext.gradual_update.default, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_backward(layout):
    """The backward op's outputs match its fake kernel's, strides included, and
    share no storage, also for a model moved to channels_last."""
    from gunn_ext import ops
    layer = make_layer(channels=6, segments=[2, 4], bottlenecks=2)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    if layout == "channels_last":
        layer = layer.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    args = ops.layer_arguments(layer, x, training=True)
    y, mean, var = ops.gradual_update(*args)
    x, convs, weights, biases, _, _, *config = args
    torch.library.opcheck(torch.ops.gunn_ext.gradual_update_backward.default,
                          (torch.randn_like(y), x, y, convs, weights, biases, mean, var, *config),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    layer = make_layer(channels=6, segments=3, backend="native", dtype=torch.float32)
    reference = twin(layer, "reference")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 6, 5, 5)
    run_and_compare(reference, compiled, x, train=True)


def test_input_is_not_modified():
    layer = make_layer(channels=6, segments=3, backend="native")
    for x in (torch.randn(2, 6, 3, 3, dtype=torch.float64),
              torch.randn(2, 6, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)):
        before = x.clone()
        y = layer(x)
        y.sum().backward()
        assert torch.equal(x, before)
        assert y.data_ptr() != x.data_ptr()


def test_meta_device_gives_the_reference_shapes():
    """A layer on the meta device (shape inference, deferred initialisation)
    runs forward and backward on the native backend as on the reference."""
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64, device="meta", requires_grad=True)
    shapes = []
    for backend in ("native", "reference"):
        layer = make_layer(channels=6, segments=2, backend=backend).to("meta")
        y = layer(x)
        y.sum().backward()
        shapes.append((y.shape, y.dtype, x.grad.shape, layer.conv_weight.grad.shape))
        x.grad = None
    assert shapes[0] == shapes[1]


def test_nan_propagates():
    layer = make_layer(channels=4, segments=2, backend="native").eval()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    x[0, 0, 1, 1] = float("nan")
    y = layer(x)
    assert torch.isnan(y).any()
    assert torch.isnan(make_layer(channels=4, segments=2).eval()(x)).any()


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
def test_running_stats_momentum_none_and_num_batches(kind):
    layer = make_layer(kind, channels=6, segments=2)
    for bn in layer.norms():
        bn.momentum = None
    run_and_compare(layer, twin(layer, "native"), torch.randn(3, 6, 4, 4, dtype=torch.float64), steps=3)


def test_running_stats_mixed_momenta():
    """Norms with different momenta (and None) are updated in separate groups."""
    layer = make_layer(channels=9, segments=[2, 3, 4])
    for k, bn in enumerate(layer.norms()):
        bn.momentum = (0.1, 0.3, None)[k % 3]
    run_and_compare(layer, twin(layer, "native"), torch.randn(2, 9, 4, 5, dtype=torch.float64), steps=3)


def test_op_does_not_autocast_inside():
    """Called directly under autocast, the op computes in its inputs' dtype."""
    layer = make_layer(channels=6, segments=2, dtype=torch.float32)
    args = ops.layer_arguments(layer, torch.randn(2, 6, 4, 4), True)
    expected = torch.ops.gunn_ext.gradual_update(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.ops.gunn_ext.gradual_update(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_autocast_leaves_float64_alone():
    """As PyTorch's convolutions do: a float64 layer under autocast computes in float64."""
    layer = make_layer(channels=6, segments=2)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = twin(layer, "native")(x), layer(x)
    assert ours.dtype == theirs.dtype == torch.float64
    assert_close(ours, theirs, torch.float64, "y")


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
@pytest.mark.parametrize("segments", [70, [3, 30, 1, 1, 2, 28, 5]], ids=["P=N", "uneven"])
@pytest.mark.parametrize("size", [(3, 5), (16, 16)], ids=["few_rows", "many_rows"])
def test_blocks_of_narrow_segments_match_reference(kind, segments, size):
    """Narrow segments share their first GEMMs in blocks (delayed updates); a
    wide segment is a block of its own. The in-block terms of the first
    GEMMs are pushes; on few rows the whole-unit kernels add the later
    gradient terms, on many the library (but for a block's last segments)."""
    layer = make_layer(kind, channels=70, segments=segments)
    x = torch.randn(2, 70, *size, dtype=torch.float64)
    run_and_compare(layer, twin(layer, "native"), x, train=True, steps=2)
    run_and_compare(layer, twin(layer, "native"), x, train=False)


@pytest.mark.parametrize("segments", [70, [3, 30, 1, 1, 2, 28, 5]], ids=["P=N", "uneven"])
def test_blocks_of_narrow_segments_float32(segments):
    """In float32, where the forward's in-block terms are pushes, the op on
    512 rows is as close to float64 truth as the reference in float32:
    output, input gradient and every parameter gradient."""
    truth = make_layer(channels=70, segments=segments)
    x = torch.randn(2, 70, 16, 16, dtype=torch.float64)
    grad = torch.randn_like(x)
    single = (x.float(), grad.float())
    ours = forward_backward(twin(truth, "native").float(), *single)
    theirs = forward_backward(twin(truth, "reference").float(), *single)
    check_against_truth(ours, theirs, forward_backward(truth, x, grad), torch.float32)


def _state_wide_gemms(layer, x):
    """GEMMs in one forward + backward that read at least half the layer's
    [rows, N] state (an operand of [rows, k], k >= N / 2)."""
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        layer(x).backward(torch.ones_like(x))
    return sum(1 for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::addmm_")
               for shape in e.input_shapes if len(shape) == 2 and shape[0] == rows and 2 * shape[1] >= x.shape[1])


def test_narrow_segments_read_the_state_once_per_block():
    """The state is read once per block of narrow segments, not once per
    segment: P = N = 240 makes no more wide GEMMs than P = 20 (one segment
    at a time, it would be 4 per segment: 960)."""
    x = torch.randn(2, 240, 2, 2)
    wide = _state_wide_gemms(GUNNLayer(240, 240, backend="native"), x)
    assert wide <= _state_wide_gemms(GUNNLayer(240, 20, backend="native"), x)
    assert wide <= 40


def _library_convolutions(layer, x):
    """ATen convolution calls made by one forward + backward of ``layer``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
    return sum(e.count for e in prof.key_averages()
               if e.key in ("aten::convolution", "aten::convolution_backward"))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [(16, 8), (9, 14)], ids=["along_channels", "along_rows"])
def test_narrow_3x3_runs_the_op_own_kernel(train, size):
    """On about 250 rows a 3x3 of 8 channels runs the op's direct kernel
    (150k multiply-adds), one of 24 the library (1.3M, over the CPU's 2^20):
    both match the reference, and only the wide one calls the library (its
    forward, its recomputation in the backward, and its backward). The direct
    kernel runs along channels in images narrower than that, else along rows."""
    layer = make_layer(channels=16, segments=[4, 12])
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    native = twin(layer, "native")
    run_and_compare(layer, native, x, train=train, steps=2)
    assert _library_convolutions(native.train(train), x) == 3
    assert _library_convolutions(make_layer(channels=16, segments=16, backend="native"), x) == 0


# ATen calls that do work on the state or allocate: GEMMs, convolutions,
# copies and elementwise steps.
_LIBRARY_CALLS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::convolution", "aten::empty",
                  "aten::copy_", "aten::clone", "aten::add_", "aten::mul_", "aten::sub", "aten::cat")


def _aten_calls(layer, x, backward=True):
    """Calls of each ATen op in one forward (+ backward) of ``layer``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = layer(x)
        if backward:
            y.sum().backward()
    return collections.Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def _library_calls(layer, x, backward=True):
    """Calls of each of _LIBRARY_CALLS in one forward (+ backward) of ``layer``."""
    calls = _aten_calls(layer, x, backward)
    return {key: calls[key] for key in _LIBRARY_CALLS}


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
def test_small_units_run_whole_in_the_op_own_kernels(kind):
    """On the CPU, the unit of a narrow segment (one bottleneck, a direct 3x3)
    runs whole in the op's own kernels, and on few rows so do the delayed
    updates' in-block terms: a segment more makes no ATen call at all, neither
    a library call (GEMM, convolution, copy, elementwise step or allocation)
    nor a view. The slope between P = 32 and P = 64 at 64 channels: two
    blocks of delayed updates each. On many rows the backward's in-block
    gradient terms go through library GEMMs
    (test_blocks_of_narrow_segments_match_reference covers both)."""
    x = torch.randn(2, 64, 3, 3, dtype=torch.float64)
    calls = {p: _aten_calls(make_layer(kind, channels=64, segments=p, backend="native"), x) for p in (32, 64)}
    more = calls[64] - calls[32]
    assert not more, f"per 32 segments more: {dict(more)}"
    assert calls[64]["aten::mm"] > 0  # the blocks' GEMMs are counted


_COUNT_MALLOC = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
static unsigned long long calls;
static void* (*next_malloc)(size_t);
unsigned long long malloc_calls(void) { return calls; }
void* malloc(size_t size) {
  if (!next_malloc) next_malloc = (void* (*)(size_t))dlsym(RTLD_NEXT, "malloc");
  __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
  return next_malloc(size);
}
"""

_HEAP_CALLS = """
import ctypes, json, sys, torch
from conftest import make_layer
calls = ctypes.CDLL(None).malloc_calls
calls.restype = ctypes.c_ulonglong
torch.set_num_threads(1)
x = torch.randn(2, 64, 3, 3, dtype=torch.float64)
counts = {}
for p in (32, 64):
    layer = make_layer(sys.argv[1], channels=64, segments=p, backend="native")
    layer(x).sum().backward()
    before = calls()
    layer(x).sum().backward()
    counts[p] = calls() - before
print(json.dumps(counts))
"""


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("cc") is None,
                    reason="counts malloc calls through an LD_PRELOAD library (Linux, a C compiler)")
@pytest.mark.parametrize("kind", ["gunn", "sunn"])
def test_a_segment_more_allocates_nothing(kind, tmp_path):
    """On few rows a segment more makes no heap allocation in a training step
    (forward and backward, the layer's host code, the op and its kernels):
    the kernels' small scratch lives on the stack and a call's own
    bookkeeping is sized once. malloc calls, counted in a process of their
    own, at P = 32 and P = 64 of 64 channels."""
    source, library = tmp_path / "count_malloc.c", tmp_path / "libcount_malloc.so"
    source.write_text(_COUNT_MALLOC)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", str(source), "-o", str(library), "-ldl"], check=True)
    env = {**os.environ, "LD_PRELOAD": str(library),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _HEAP_CALLS, kind], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    counts = {int(p): n for p, n in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    assert counts[32] > 0, counts  # the counter sees the process's allocations
    assert counts[64] <= counts[32], f"malloc calls per step at P = 32 and P = 64: {counts}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_forward_pushes_in_block_terms_on_many_rows(dtype):
    """In float and double the forward's in-block terms are pushes of each
    segment's update into the block's later first-GEMM outputs, in the op's
    own kernel, on any number of rows: on 512 rows too a segment more makes
    no library call in the forward (the slope between P = 32 and P = 64 at
    64 channels)."""
    x = torch.randn(2, 64, 16, 16, dtype=dtype)
    calls = {p: _library_calls(make_layer(channels=64, segments=p, backend="native", dtype=dtype),
                               x, backward=False)
             for p in (32, 64)}
    per_segment = {key: (calls[64][key] - calls[32][key]) / 32 for key in _LIBRARY_CALLS}
    assert per_segment == dict.fromkeys(_LIBRARY_CALLS, 0), per_segment


@pytest.mark.skipif(sys.platform != "linux", reason="setup.py enables OpenMP on Linux only")
def test_cpu_kernels_run_on_threads_where_torch_does():
    """The op's CPU kernels split their work over torch's threads wherever
    torch itself runs on OpenMP; built without it, every at::parallel_for in
    them would run on one thread."""
    assert torch.ops.gunn_ext.cpu_kernels_parallel() == torch.backends.openmp.is_available()


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
@pytest.mark.parametrize("segments", [48, [6, 18, 24]], ids=["whole_units", "library_units"])
def test_results_do_not_depend_on_the_number_of_threads(kind, segments):
    """The op's kernels sum over fixed chunks in a fixed order: one thread and
    four give bitwise the same output, input gradient, BN gradients and
    running statistics, and, where units run whole, 3x3 and last 1x1 weight
    gradients, on enough rows (4 x 24 x 24) that the kernels split their work
    into tasks. The weight gradients of library GEMMs and convolutions
    follow the library's split of the rows over threads: they agree to
    rounding."""
    layer = make_layer(kind, channels=48, segments=segments, dtype=torch.float32, backend="native")
    x = torch.randn(4, 48, 24, 24)
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 4):
            torch.set_num_threads(count)
            copy = twin(layer, "native").train()
            results.append(forward_backward(copy, x, grad) + list(copy.buffers()))
    finally:
        torch.set_num_threads(threads)
    names = ["y", "dx"] + [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    layout = layer.units.layout
    for name, one, four in zip(names, *results):
        if name != "units.conv_weight":
            assert torch.equal(one, four), name
            continue
        assert relative_error(one, four) < 1e-6
        if segments == 48:
            for i in range(len(layout.segments)):
                for slot in (layout.conv2(i, 0), layout.conv3(i, 0)):
                    assert torch.equal(slot.of(one), slot.of(four)), (i, slot)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("segments", [16, [4, 12]], ids=["whole_units", "mixed"])
def test_half_precision_on_cpu(dtype, segments):
    """In bfloat16 and float16 the CPU op (its whole small units, and a wide
    unit step by step: a 3x3 of 24 channels on 256 rows) is as close to
    float64 truth as PyTorch in the same precision."""
    truth = make_layer(channels=16, segments=segments)
    x = torch.randn(4, 16, 8, 8, dtype=torch.float64)
    grad = torch.randn_like(x)
    ours = forward_backward(twin(truth, "native").to(dtype), x.to(dtype), grad.to(dtype))
    assert all(t.dtype == dtype for t in ours)
    theirs = forward_backward(twin(truth, "reference").to(dtype), x.to(dtype), grad.to(dtype))
    check_against_truth(ours, theirs, forward_backward(truth, x, grad), dtype)
