"""The native backend on the GPU: CUDA fused kernels, graph replay (the triton ops' too),
determinism, memory.

Run on a machine with a CUDA GPU; every test here is skipped without one.
"""
import os

# cuBLAS reads this when its first handle is created; deterministic mode needs it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import (LAYER_CASES, LOW_PRECISION, assert_close, check_against_truth,  # noqa: E402
                      forward_backward, make_layer, relative_norm, run_and_compare, twin)
from gunn_ext import backends, conventions, cuda_graphs, ops  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]



@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def _fresh_graph_cache():
    assert ops.has_cuda_kernels(), "gunn_ext was built without its CUDA kernels"
    cuda_graphs.clear()
    yield
    cuda_graphs.clear()


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("shortcut", [True, False], ids=["shortcut", "plain"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float32_matches_reference(case, shortcut, train):
    layer = make_layer(shortcut=shortcut, dtype=torch.float32, device="cuda", **LAYER_CASES[case])
    x = torch.randn(4, layer.channels, 7, 5, device="cuda")
    run_and_compare(layer, twin(layer, "native"), x, train=train, steps=3)


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_layouts(kind, layout):
    layer = make_layer(kind, channels=20, segments=[8, 12], dtype=torch.float32, device="cuda")
    if layout == "strided":
        x = torch.randn(6, 41, 7, 11, device="cuda")[::2, 1::2, :, 1:6]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(3, 20, 7, 5, device="cuda")
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    native = twin(layer, "native")
    run_and_compare(layer, native, x, train=True, steps=2)
    run_and_compare(layer, native, x, train=False)


LARGE_BATCHES = pytest.mark.parametrize("shape", [(64, 48, 16, 16), (256, 12, 32, 32)],
                                        ids=["wide", "tall"])


def large_batch_layer(channels, dtype):
    """The layer of a LARGE_BATCHES shape: 12-channel segments (wide), 6-channel (tall)."""
    return make_layer(channels=channels, segments=4 if channels == 48 else 2, dtype=dtype, device="cuda")


@LARGE_BATCHES
def test_reference_large_batch(shape):
    """The reference layer alone at test_large_batch's shapes, synchronised.

    Its BatchNorms' views into the flat parameter tensors: with 6-channel
    segments (tall) most of them start 8 bytes past a 16-byte boundary, where
    cuDNN's channels-last batch norm faults, so the reference computes with
    aligned copies. A fault in PyTorch's batch norm shows here, apart from the op's."""
    layer = large_batch_layer(shape[1], torch.float32)
    x = torch.randn(*shape, device="cuda").to(memory_format=torch.channels_last)
    results = forward_backward(layer, x, torch.randn_like(x))
    torch.cuda.synchronize()
    assert all(r.isfinite().all() for r in results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_misaligned_norm_called_alone(dtype):
    """A norm whose views start off a 16-byte boundary, called on its own on a
    channels_last input (cuDNN's NHWC kernels, float32 parameters), equals
    nn.BatchNorm2d."""
    layer = large_batch_layer(12, torch.float32)
    norm = next(n for n in layer.norms() if n.weight.data_ptr() % 16)
    plain = torch.nn.BatchNorm2d(norm.num_features, device="cuda")
    plain.load_state_dict({name: getattr(norm, name).clone() for name in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    x = torch.randn(64, norm.num_features, 32, 32, device="cuda", dtype=dtype)
    x = x.to(memory_format=torch.channels_last)
    results = [module(x) for module in (norm, plain)]
    torch.cuda.synchronize()
    assert torch.equal(*results)
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(norm, name), getattr(plain, name)), name


@LARGE_BATCHES
def test_large_batch(shape):
    """Enough rows that the column reductions combine hundreds of chunk partials.

    At 262144 rows PyTorch's own float32 result is off by about 1.5e-3 (relative
    norm of the input gradient), so both are judged against float64 truth. The
    native op runs first and is synchronised alone, so a fault is its own."""
    truth_layer = large_batch_layer(shape[1], torch.float64)
    native = twin(truth_layer, "native").float()
    x = torch.randn(*shape, device="cuda", dtype=torch.float64).to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    ours = forward_backward(native, x.float(), grad.float())
    torch.cuda.synchronize()
    theirs = forward_backward(twin(truth_layer, "reference").float(), x.float(), grad.float())
    expected = forward_backward(truth_layer, x, grad)
    check_against_truth(ours, theirs, expected, torch.float32)
    for (name, r), n in zip(truth_layer.named_buffers(), native.buffers()):
        if r.is_floating_point():
            assert relative_norm(n, r) <= LOW_PRECISION[torch.float32], f"buffer {name}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_tf32_products_as_close_as_pytorch_in_tf32(train):
    """With every float32 product in TF32 (the training CLI's default), the
    native op's library GEMMs and 3x3s (units of 16 and 32 channels) multiply
    in TF32 as the reference's convolutions do: as close to float64 truth as
    the reference, within twice its error."""
    truth = make_layer(channels=48, segments=[16, 32], dtype=torch.float64, device="cuda").train(train)
    x = torch.randn(8, 48, 9, 7, device="cuda", dtype=torch.float64)
    grad = torch.randn_like(x)
    expected = forward_backward(truth, x, grad)
    with conventions.float32_products(True):
        ours = forward_backward(twin(truth, "native").float(), x.float(), grad.float())
        theirs = forward_backward(twin(truth, "reference").float(), x.float(), grad.float())
    check_against_truth(ours, theirs, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_low_precision(dtype, train, channels_last):
    truth = make_layer(channels=24, segments=[6, 6, 12], dtype=torch.float64, device="cuda").train(train)
    torch_lowp = twin(truth, "reference").to(dtype)
    native = twin(truth, "native").to(dtype)
    x = torch.randn(8, 24, 9, 7, device="cuda", dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    expected = forward_backward(truth, x, grad)
    ours = forward_backward(native, x.to(dtype), grad.to(dtype))
    theirs = forward_backward(torch_lowp, x.to(dtype), grad.to(dtype))
    assert all(t.dtype == dtype for t in ours), [t.dtype for t in ours]
    check_against_truth(ours, theirs, expected, dtype)
    for (name, r), n in zip(truth.named_buffers(), native.buffers()):
        if r.is_floating_point():
            assert relative_norm(n, r) <= LOW_PRECISION[dtype], f"buffer {name}"


# Graph replay (gunn_ext.graph_replay), the same engine for the native and the triton ops.
REPLAYED = ["native", pytest.param("triton", marks=pytest.mark.skipif(
    not backends.INSTALL["triton_installed"], reason="triton is not installed"))]
STATS = {name: (f"{name}_forward", f"{name}_backward") for name in ("native", "triton")}


def _replayed_layer(backend):
    """A small float32 layer in eval mode on the GPU, run by ``backend``."""
    return make_layer(channels=12, segments=3, dtype=torch.float32, device="cuda", backend=backend).eval()


@pytest.mark.parametrize("backend", REPLAYED)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["gunn", "sunn"])
def test_graph_replay_equals_eager(train, kind, backend, deterministic):
    """Captured at the first call, replayed from the second, bitwise equal to eager
    runs, while the input and the incoming gradient move to new addresses."""
    forward_stats, backward_stats = STATS[backend]
    layer = make_layer(kind, channels=24, segments=[4, 8, 12], bottlenecks=2, dtype=torch.float32,
                       device="cuda", backend=backend).train(train)
    x = torch.randn(8, 24, 8, 8, device="cuda").to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    with cuda_graphs.disabled():
        eager = [t.clone() for t in forward_backward(layer, x, grad)]
    assert cuda_graphs.enabled()
    cuda_graphs.clear()
    kept = []
    for step in range(4):
        kept.append(torch.empty_like(x))  # so that the next activations land elsewhere
        replayed = forward_backward(layer, x.clone(), grad.clone())
        for k, (a, b) in enumerate(zip(replayed, eager)):
            assert torch.equal(a, b), f"step {step}: result {k} differs from the eager run"
    stats = cuda_graphs.stats()
    for name in (forward_stats, backward_stats):
        assert (stats[name].captures, stats[name].replays, stats[name].eager) == (1, 3, 0), stats


@pytest.mark.parametrize("backend", REPLAYED)
def test_graph_replay_under_autocast(backend, deterministic):
    """The weights' per-call casts are copied in: replays from the second call, equal to eager."""
    layer = make_layer(channels=24, segments=[4, 8, 12], dtype=torch.float32, device="cuda", backend=backend)
    x = torch.randn(8, 24, 8, 8, device="cuda").to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with cuda_graphs.disabled():
            eager = [t.clone() for t in forward_backward(layer, x, grad)]
        cuda_graphs.clear()
        for step in range(3):
            replayed = forward_backward(layer, x, grad)
            for k, (a, b) in enumerate(zip(replayed, eager)):
                assert torch.equal(a, b), f"step {step}: result {k} differs from the eager run"
    stats = cuda_graphs.stats()
    for name in STATS[backend]:
        assert (stats[name].captures, stats[name].replays, stats[name].eager) == (1, 2, 0), stats


@pytest.mark.parametrize("backend", REPLAYED)
def test_graph_replay_follows_new_values(backend):
    """A replay reads the current contents of its inputs, parameters and running stats."""
    layer = _replayed_layer(backend)
    reference = twin(layer, "reference")
    x = torch.randn(4, 12, 6, 6, device="cuda")
    with torch.no_grad():
        for step in range(5):
            x.normal_()
            for bn in layer.norms():
                bn.running_mean.uniform_(-0.3, 0.3)
            layer.units[0].bottlenecks[0].conv1.weight.mul_(1.01)
            reference.load_state_dict(layer.state_dict())
            y = layer(x)
            assert_close(y, reference(x), torch.float32, f"step {step}")
            del y
    stats = cuda_graphs.stats()[STATS[backend][0]]
    assert (stats.captures, stats.replays) == (1, 4), stats


@pytest.mark.parametrize("backend", REPLAYED)
def test_graph_replay_recaptures_replaced_parameters(backend):
    """load_state_dict(assign=True) gives the layer new tensors: new graphs, never stale weights."""
    layer = _replayed_layer(backend)
    x = torch.randn(4, 12, 6, 6, device="cuda")
    with torch.no_grad():
        for step in range(3):
            state = {k: v + 0.1 if v.is_floating_point() else v for k, v in layer.state_dict().items()}
            layer.load_state_dict(state, assign=True)
            reference = twin(layer, "reference")
            for _ in range(2):
                assert_close(layer(x), reference(x), torch.float32, f"step {step}")
    stats = cuda_graphs.stats()[STATS[backend][0]]
    assert (stats.captures, stats.replays) == (3, 3), stats


@pytest.mark.parametrize("backend", REPLAYED)
def test_runs_eagerly_inside_a_user_capture(backend):
    layer = _replayed_layer(backend)
    reference = twin(layer, "reference")
    static_x = torch.randn(4, 12, 5, 7, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        assert_close(static_y, reference(new_x), torch.float32, "user graph replay")


def test_switch_off():
    layer = make_layer(channels=8, segments=2, dtype=torch.float32, device="cuda", backend="native")
    x = torch.randn(2, 8, 5, 5, device="cuda")
    with cuda_graphs.disabled():
        assert not cuda_graphs.enabled()
        for _ in range(4):
            forward_backward(layer, x, torch.ones_like(x))
    assert cuda_graphs.enabled()
    assert cuda_graphs.stats()["native_forward"].captures == 0


def _gpu_kernels(layer, x):
    """GPU kernels run by one eager training forward + backward of ``layer``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer(x).backward(torch.ones_like(x))
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.parametrize("kind", ["gunn", "sunn"])
def test_kernels_per_small_segment(kind):
    """The emulator's count holds on the GPU: a small segment in training
    costs 12 kernels forward + backward (SUNN 11), the op's own, and no
    library kernel or copy (the slope between P = 12 and P = 6 at 12
    channels, one block of delayed updates each; graph replay off)."""
    x = torch.randn(2, 12, 4, 5, device="cuda")
    counts = {}
    with cuda_graphs.disabled():
        for segments in (6, 12):
            layer = make_layer(kind, channels=12, segments=segments, dtype=torch.float32,
                               device="cuda", backend="native").train()
            _gpu_kernels(layer, x)  # warm-up: cuBLAS handles, autotuning
            counts[segments] = _gpu_kernels(layer, x)
    assert (counts[12] - counts[6]) / 6 == (12 if kind == "gunn" else 11), counts


def test_repeated_backward_is_bitwise_equal(deterministic):
    layer = make_layer(channels=36, segments=3, dtype=torch.float32, device="cuda", backend="native")
    x = torch.randn(16, 36, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    with cuda_graphs.disabled():
        first = [t.clone() for t in forward_backward(layer, x, grad)]
        for _ in range(2):
            again = forward_backward(layer, x, grad)
            assert all(torch.equal(a, b) for a, b in zip(again, first))


def test_autocast_bfloat16():
    """A bfloat16 output, float32 gradients, and no further from float64 truth than PyTorch."""
    truth = make_layer(channels=24, segments=3, dtype=torch.float64, device="cuda")
    layer = twin(truth, "reference").float()
    native = twin(truth, "native").float()
    x = torch.randn(4, 24, 8, 8, device="cuda", dtype=torch.float64)
    grad = torch.randn_like(x)
    expected = forward_backward(truth, x, grad)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        theirs = forward_backward(layer, x.float(), grad.float())
        ours = forward_backward(native, x.float(), grad.float())
    assert ours[0].dtype == torch.bfloat16, ours[0].dtype
    assert [t.dtype for t in ours[1:]] == [t.dtype for t in theirs[1:]]
    check_against_truth(ours, theirs, expected, torch.bfloat16)


def peak_training_bytes(layer, x):
    """Peak allocation of forward + backward beyond x, its gradient and the parameters."""
    x = x.detach().requires_grad_()
    grad = torch.randn_like(x)
    for p in layer.parameters():
        p.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with cuda_graphs.disabled():
        layer(x).backward(grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_peak_memory(layout):
    """Algorithm 1 keeps only x and y: the extra memory is about two activations.

    Allowed: 2.5 activations (y, the gradient buffer, half of one more), the
    parameter gradients (twice the parameters, for packed copies) and one
    update unit's intermediates for forward and backward (about 4n + 8Kn
    columns per row). NCHW pays layout conversions on top; its ratio is printed.
    """
    layer = make_layer(channels=240, segments=20, dtype=torch.float32, device="cuda",
                       backend="native")
    x = torch.randn(32, 240, 32, 32, device="cuda")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    n, mid = max(layer.segments), layer.expansion * max(layer.segments)
    activation = x.numel() * x.element_size()
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    workspace = rows * (4 * n + 8 * mid) * x.element_size() + (1 << 20)
    peak_training_bytes(layer, x)  # cuBLAS workspaces of both threads, outside the measurement
    peak = peak_training_bytes(layer, x)
    print(f"peak memory ({layout}): {peak / activation:.2f} activations "
          f"({peak / 2**20:.1f} MiB; activation {activation / 2**20:.1f} MiB, "
          f"workspace allowance {workspace / 2**20:.1f} MiB)")
    budget = 2.5 * activation + 2 * params + workspace
    if layout == "nchw":
        budget += 5 * activation  # layout conversions of x, y and the gradients
    assert peak <= budget, f"{layout}: peak {peak / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB"
