"""The CUDA fused kernels' own source, run on the CPU through an emulator.

``csrc/cuda/*.cu`` compile as C++ against ``csrc/emulation/cuda_emulator.h``
(real threads per block, real barriers and shared memory) into a second op
library, ``torch.ops.gunn_ext_emulated``: the same orchestration
(``csrc/gradual_update.cpp``) with the CUDA kernels in place of the CPU ones.
Its layers are compared with the reference on values, gradients and running
statistics, so the kernels' indexing, vector widths, tiling and two-stage
reductions are tested without a GPU. The GEMMs and the 3x3 convolution are
ATen's CPU ones here, and CUDA graph replay is not emulated.

``GUNN_EXT_EMULATION_SANITIZER=address`` (or ``thread``, ``undefined``) builds
the library with that sanitizer; run pytest with the sanitizer's runtime
preloaded, e.g. ``LD_PRELOAD=$(g++ -print-file-name=libasan.so)
ASAN_OPTIONS=detect_leaks=0``, to check the kernels' memory accesses, or
``LD_PRELOAD=$(g++ -print-file-name=libtsan.so)
TSAN_OPTIONS=ignore_noninstrumented_modules=1`` to check that the threads of a
block never race on shared memory. Leave out the launch counts there
(``-k "not launches"``): ``torch.profiler`` loads Triton, which aborts under a
preloaded sanitizer.
"""
import contextlib
import os
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from conftest import (LAYER_CASES, LOW_PRECISION, TOLERANCE, assert_same_non_finite, check_against_truth,
                      forward_backward, make_layer, make_non_finite, relative_norm, run_and_compare, twin)
from gunn_ext import conventions, ops

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "gunn_ext_emulated"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", autouse=True)
def uninitialized_memory_is_nan():
    """Every tensor the op allocates starts as NaN (integers at their maximum),
    where a GPU's caching allocator hands out old contents and a fresh CPU
    page is zero: a kernel that reads an allocation before writing it fails."""
    enabled, warn_only = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    # torch.use_deterministic_algorithms also configures Inductor, whose import
    # loads Triton, which aborts under a preloaded AddressSanitizer.
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all()
    yield
    torch._C._set_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture(scope="module")
def emulated_op():
    """Builds the emulated library (about a minute, cached) and registers its ops."""
    sources = [ROOT / "csrc" / "gunn_ext.cpp", ROOT / "csrc" / "gradual_update.cpp",
               ROOT / "csrc" / "cpu" / "gradual_update_cpu.cpp",
               *sorted((ROOT / "csrc" / "emulation").glob("*.cpp"))]
    sanitizer = os.environ.get("GUNN_EXT_EMULATION_SANITIZER")
    sanitize = [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"] if sanitizer else []
    # The build's tools run without a preloaded sanitizer runtime (ninja crashes under TSan's).
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        cpp_extension.load(
            name=NAMESPACE + (f"_{sanitizer}" if sanitizer else ""),
            sources=[str(s) for s in sources], is_python_module=False,
            # Renaming the C++ namespace renames the op namespace too (TORCH_LIBRARY
            # stringizes the expanded name), so both libraries load side by side.
            extra_cflags=["-O2", "-std=c++20", "-DGUNN_EXT_EMULATE_CUDA", f"-Dgunn_ext={NAMESPACE}",
                          *sanitize],
            extra_ldflags=sanitize)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::gradual_update", "Autograd"):
        ops.register_layer_op(f"{NAMESPACE}::gradual_update",
                              f"{NAMESPACE}::gradual_update_backward", conventions.stats_dtype)
    return torch.ops.gunn_ext_emulated.gradual_update


class Emulated(torch.nn.Module):
    """``layer`` run by the emulated CUDA kernels."""

    def __init__(self, layer, op):
        super().__init__()
        self.layer, self.op = layer, op

    def forward(self, x):
        return ops.run_layer_op(self.op, self.layer, x)




@pytest.mark.parametrize("kind", ["gunn", "sunn"])
@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("shortcut", [True, False], ids=["shortcut", "plain"])
def test_matches_reference_float64(emulated_op, kind, case, shortcut):
    layer = make_layer(kind, shortcut=shortcut, **LAYER_CASES[case])
    x = torch.randn(2, layer.channels, 7, 5, dtype=torch.float64)
    emulated = Emulated(twin(layer, "reference"), emulated_op)
    run_and_compare(layer, emulated, x, train=True, steps=2)
    run_and_compare(layer, emulated, x, train=False)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_vector_widths_float32(emulated_op, train):
    """Column blocks of 8, 4 and 12 float32 channels: 16-byte packs where aligned."""
    layer = make_layer(channels=24, segments=[8, 4, 12], dtype=torch.float32)
    x = torch.randn(3, 24, 6, 9)
    run_and_compare(layer, Emulated(twin(layer, "reference"), emulated_op), x, train=train, steps=2)


def test_packs_of_columns_at_unaligned_offsets(emulated_op):
    """A 4-channel block at channel 2 of 8: 4-wide rows, an 8-wide stride, and
    an address 8 bytes past a 16-byte boundary, so only 2-value packs fit (the
    emulator fails a launch that accesses a pack at a misaligned address, as a
    GPU faults on one). Two bottlenecks per unit, so the column kernels run."""
    layer = make_layer(channels=8, segments=[2, 4, 2], bottlenecks=2, dtype=torch.float32)
    x = torch.randn(2, 8, 5, 7).to(memory_format=torch.channels_last)
    run_and_compare(layer, Emulated(twin(layer, "reference"), emulated_op), x, train=True)


def test_channels_last_and_strided_input(emulated_op):
    layer = make_layer(channels=9, segments=[4, 5])
    emulated = Emulated(twin(layer, "reference"), emulated_op)
    x = torch.randn(2, 9, 5, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    run_and_compare(layer, emulated, x, train=True)
    x = torch.randn(4, 18, 7, 10, dtype=torch.float64)[::2, 1::2, :, ::2]
    run_and_compare(layer, emulated, x, train=True)


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
@pytest.mark.parametrize("segments", [40, [3, 1, 20, 2, 2, 12]], ids=["P=N", "uneven"])
def test_blocks_of_small_units(emulated_op, kind, segments):
    """Blocks of delayed updates whose units all run whole (their in-block
    terms in the unit kernels), and blocks that mix a wide unit in (its terms
    through the library)."""
    layer = make_layer(kind, channels=40, segments=segments)
    x = torch.randn(2, 40, 3, 5, dtype=torch.float64)
    emulated = Emulated(twin(layer, "reference"), emulated_op)
    run_and_compare(layer, emulated, x, train=True, steps=2)
    run_and_compare(layer, emulated, x, train=False)


@pytest.mark.parametrize("segments", [40, [3, 1, 20, 2, 2, 12]], ids=["P=N", "uneven"])
def test_blocks_of_small_units_float32(emulated_op, segments):
    """In float32, where the unit kernels add the in-block terms themselves,
    the emulated op is as close to float64 truth as the reference in float32:
    output, input gradient, every parameter gradient and the running
    statistics."""
    truth = make_layer(channels=40, segments=segments)
    emulated = Emulated(twin(truth, "reference").float(), emulated_op)
    x = torch.randn(2, 40, 6, 5, dtype=torch.float64)
    grad = torch.randn_like(x)
    single = (x.float(), grad.float())
    ours = forward_backward(emulated, *single)
    assert all(t.dtype == torch.float32 for t in ours), [t.dtype for t in ours]
    theirs = forward_backward(twin(truth, "reference").float(), *single)
    check_against_truth(ours, theirs, forward_backward(truth, x, grad), torch.float32)
    for (name, r), e in zip(truth.named_buffers(), emulated.buffers()):
        if r.is_floating_point():
            assert relative_norm(e, r) <= LOW_PRECISION[torch.float32], f"buffer {name}"


@pytest.mark.parametrize("channels, segments, expansion, height", [(6, [1, 2, 3], 1, 40), (16, [8, 8], 2, 48)],
                         ids=["narrow", "widest"])
def test_many_row_chunks(emulated_op, channels, segments, expansion, height):
    """Enough rows that every column reduction combines several chunk
    partials; for the widest whole unit (8 channels, 16 in its bottleneck, 24
    columns in its first statistics), enough that each thread of a combining
    block takes more than one batch of chunks."""
    layer = make_layer(channels=channels, segments=segments, expansion=expansion)
    x = torch.randn(2, channels, height, 45 if height == 40 else height, dtype=torch.float64)
    run_and_compare(layer, Emulated(twin(layer, "reference"), emulated_op), x, train=True)


def test_several_rows_per_thread(emulated_op):
    """More rows than the unit kernels have threads (at most 512 blocks of
    128): from 65536 rows on each thread runs several rows in turn, here two
    or three, and the block terms of a two-segment block with them."""
    layer = make_layer(channels=3, segments=[1, 2], expansion=1)
    x = torch.randn(1, 3, 400, 400, dtype=torch.float64)
    run_and_compare(layer, Emulated(twin(layer, "reference"), emulated_op), x, train=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(emulated_op, dtype):
    """8-value packs, float32 accumulation and statistics.

    The CPU op runs the same orchestration and GEMMs with the CPU fused
    kernels, so the two agree to rounding; both are as close to float64 truth
    as PyTorch in the same precision."""
    truth = make_layer(channels=16, segments=[8, 8])
    torch_lowp = twin(truth, "reference").to(dtype)
    native_cpu = twin(truth, "native").to(dtype)
    emulated = Emulated(twin(truth, "reference").to(dtype), emulated_op)
    x = torch.randn(4, 16, 9, 7, dtype=torch.float64)
    grad = torch.randn_like(x)
    expected = forward_backward(truth, x, grad)
    ours = forward_backward(emulated, x.to(dtype), grad.to(dtype))
    assert all(t.dtype == dtype for t in ours), [t.dtype for t in ours]
    cpu_kernels = forward_backward(native_cpu, x.to(dtype), grad.to(dtype))
    for k, (a, b) in enumerate(zip(ours, cpu_kernels)):
        assert relative_norm(a, b) <= TOLERANCE[dtype], f"result {k}: {relative_norm(a, b):.3g}"
    check_against_truth(ours, forward_backward(torch_lowp, x.to(dtype), grad.to(dtype)), expected, dtype)
    for (name, r), e in zip(truth.named_buffers(), emulated.buffers()):
        if r.is_floating_point():
            assert relative_norm(e, r) <= LOW_PRECISION[dtype], f"buffer {name}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("segments", [[3, 3], [6, 24]], ids=["whole_units", "library_units"])
@pytest.mark.parametrize("case", ["nan_weight", "inf_input"])
def test_non_finite_values_follow_the_reference(emulated_op, case, segments, train):
    """A NaN weight or an infinite input gives the reference's NaN and infinity
    pattern and finite values (test_layers.py's case): the CUDA kernels' ReLU
    backward passes a NaN output's gradient."""
    channels = sum(segments)
    layer = make_layer(channels=channels, segments=segments).train(train)
    x = make_non_finite(layer, torch.randn(2, channels, 7, 6, dtype=torch.float64), case)
    grad = torch.randn_like(x)
    ours = forward_backward(Emulated(twin(layer, "reference"), emulated_op).train(train), x, grad)
    theirs = forward_backward(layer, x, grad)
    assert_same_non_finite(ours, theirs, torch.float64, ["y", "dx"] + [n for n, _ in layer.named_parameters()])


def test_repeated_runs_are_bitwise_equal(emulated_op):
    """Fixed reduction orders: concurrent threads never change a result."""
    layer = make_layer(channels=12, segments=[4, 8], dtype=torch.float32)
    emulated = Emulated(twin(layer, "reference"), emulated_op)
    x = torch.randn(2, 12, 30, 40)
    grad = torch.randn_like(x)
    first = forward_backward(emulated, x, grad)
    again = forward_backward(emulated, x, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@contextlib.contextmanager
def blocks_reversed():
    """The emulator runs each launch's blocks last to first (a GPU may run them
    in any order), and in index order again afterwards."""
    torch.ops.gunn_ext_emulated.emulate_reversed_blocks(True)
    try:
        yield
    finally:
        torch.ops.gunn_ext_emulated.emulate_reversed_blocks(False)


@pytest.mark.parametrize("segments", [[4, 8], [3, 1, 20, 2, 2, 12]], ids=["whole_units", "mixed_block"])
def test_block_order_is_irrelevant(emulated_op, segments):
    """No block reads what another block of the same launch writes: blocks
    run last to first give bitwise the results of blocks in index order
    (outputs, gradients and running statistics, train and eval)."""
    channels = sum(segments)
    x = torch.randn(2, channels, 20, 24).to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)

    def results():
        layer = make_layer(channels=channels, segments=segments, dtype=torch.float32)
        emulated = Emulated(layer, emulated_op)
        trained = forward_backward(emulated, x, grad)
        with torch.no_grad():
            evaluated = emulated.eval()(x)
        return [*trained, evaluated, *emulated.buffers()]

    in_order = results()
    with blocks_reversed():
        reversed_order = results()
    differing = [k for k, (a, b) in enumerate(zip(in_order, reversed_order)) if not torch.equal(a, b)]
    assert not differing, f"results {differing} depend on the order of blocks"


# ATen calls that launch at least one kernel on a GPU: the library GEMMs and
# convolutions, and copies, fills and elementwise ops on device tensors.
LIBRARY_LAUNCHES = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::convolution",
                    "aten::convolution_backward", "aten::copy_", "aten::fill_", "aten::zero_",
                    "aten::sub", "aten::cat", "aten::add_", "aten::lerp_")


def _launches(emulated, x):
    """(own, library): the emulated kernels' launches in one training forward +
    backward, and the ATen calls in it that launch kernels on a GPU."""
    count = torch.ops.gunn_ext_emulated.emulated_launches
    before = count()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        emulated(x).backward(torch.ones_like(x))
    library = sum(e.count for e in prof.key_averages() if e.key in LIBRARY_LAUNCHES)
    return count() - before, library


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
def test_launches_per_small_segment(emulated_op, kind):
    """GPU launches per segment of a small segment in training, forward +
    backward: the slope between P = 24 and P = 12 at 24 channels (one block
    of delayed updates each, both of more than six equal segments, so that
    both take the block's masked weight-gradient product). A small unit runs
    whole, with its block terms, in the op's own kernels: 4 launches forward,
    3 to recompute it and 5 for its backward (GUNN; SUNN has no block terms
    to add, so its forward recomputation is 2), and no library call."""
    x = torch.randn(2, 24, 4, 5, dtype=torch.float32)
    counts = {}
    for segments in (12, 24):
        layer = make_layer(kind, channels=24, segments=segments, dtype=torch.float32)
        counts[segments] = _launches(Emulated(twin(layer, "reference"), emulated_op).train(), x)
    own, library = ((a - b) / 12 for a, b in zip(counts[24], counts[12]))
    assert (own, library) == ((12, 0) if kind == "gunn" else (11, 0)), (own, library)


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
def test_launches_per_library_segment(emulated_op, kind):
    """The op's own launches per segment whose unit runs through the libraries
    (mid above the direct 3x3's channels), training forward + backward: the
    slope between P = 2 and P = 4 at 68 channels, every block a single
    segment. 9 forward (the statistics of pre1, pre2 and pre3 at 2 launches
    each, BN + ReLU twice, the residual), 2 to recompute the tape (BN + ReLU
    twice: the recomputation writes no output) and 12 backward (each of the
    four BNs' sums and input gradient)."""
    x = torch.randn(2, 68, 4, 5, dtype=torch.float32)
    counts = {}
    for segments in (2, 4):
        layer = make_layer(kind, channels=68, segments=segments, dtype=torch.float32)
        counts[segments] = _launches(Emulated(twin(layer, "reference"), emulated_op).train(), x)[0]
    assert (counts[4] - counts[2]) / 2 == 9 + 2 + 12, counts
