import copy
import os

import pytest
import torch

from gunn_ext import GUNNLayer, SUNNLayer

CUDA = pytest.param("cuda", marks=pytest.mark.cuda)

# The layer configurations every backend is checked against the reference on
# (make_layer's keywords): one segment, one channel per segment, uneven
# segments, two bottlenecks per unit, another expansion. Odd and tiny, for
# the Triton interpreter and the CUDA emulator.
LAYER_CASES = {
    "P=1": dict(channels=6, segments=1),
    "P=N": dict(channels=5, segments=5),
    "uneven": dict(channels=10, segments=[3, 1, 6]),
    "bottlenecks=2": dict(channels=8, segments=2, bottlenecks=2),
    "expansion=3": dict(channels=6, segments=[2, 4], expansion=3),
}
DEVICES = ["cpu", CUDA]

# Tolerances per dtype on max |a - b| / max(max |b|, 1): relative for large
# values, absolute for values near zero (e.g. BN-cancelled gradients).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}

# Relative-norm tolerances against float64 truth, for outputs and running
# statistics, and for gradients. A result may also be up to twice as far from
# truth as PyTorch's own result in the same dtype. Low-precision gradients
# are inherently noisy: small-batch BatchNorm gradients cancel, and rounding
# flips ReLU masks. PyTorch's own are 2-5% (float16) and 7-10% (bfloat16)
# from truth at the test shapes; a wrong kernel is off by O(1).
# In float32 a rounding-level difference can flip one ReLU too, which moves
# the input gradient by about 1e-3 relative (benchmarks/seq_update.py's floors).
LOW_PRECISION = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
LOW_PRECISION_GRADIENTS = {torch.float32: 1e-2, torch.float16: 6e-2, torch.bfloat16: 1.5e-1}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Where the tests append the id of a test after which the CUDA context was lost
# (benchmarks/gpu_check.sh reruns the others without it, then diagnoses it),
# and the session's exit status then (pytest's own are 0 to 5).
CUDA_FAULT_FILE = "GUNN_CUDA_FAULT_FILE"
CUDA_CONTEXT_LOST = 7


def pytest_runtest_teardown(item, nextitem):
    """Stops the session at the test after which the CUDA context is lost.

    A device-side fault (an illegal or misaligned address) is sticky: every
    later CUDA call in the process fails with it, so the tests after it would
    report the same error as failures of their own.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:  # torch.AcceleratorError
        if os.environ.get(CUDA_FAULT_FILE):
            with open(os.environ[CUDA_FAULT_FILE], "a") as f:
                f.write(item.nodeid + "\n")
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        pytest.exit(f"the CUDA context was lost in {item.nodeid} ({reason}); "
                    "every later CUDA call in this process would fail with it", returncode=CUDA_CONTEXT_LOST)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 matmuls, so float32 tolerances mean what they say."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make_layer(kind="gunn", channels=12, segments=3, expansion=2, bottlenecks=1, shortcut=True,
               backend="reference", dtype=torch.float64, device="cpu", seed=0):
    """A layer with random (not initial) BN parameters and running statistics."""
    torch.manual_seed(seed)
    cls = GUNNLayer if kind == "gunn" else SUNNLayer
    layer = cls(channels, segments, expansion, bottlenecks, shortcut, backend=backend)
    with torch.no_grad():
        for bn in layer.norms():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    return layer.to(device=device, dtype=dtype)


def twin(layer, backend):
    other = copy.deepcopy(layer)
    other.backend = backend
    return other


def relative_error(actual, expected):
    scale = expected.detach().abs().max().clamp_min(1.0)
    return ((actual.detach() - expected.detach()).abs().max() / scale).item()


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: non-finite values"
    err = relative_error(actual.double(), expected.double())
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]:.3g}"


def make_non_finite(layer, x, case):
    """``x``, or a copy with an infinity in its last channels (``"inf_input"``),
    after a NaN is put in the last unit's 3x3 weight (``"nan_weight"``)."""
    if case == "nan_weight":
        with torch.no_grad():
            layer.units[-1].bottlenecks[0].conv2.weight[0, 0, 1, 1] = float("nan")
        return x
    x = x.clone()
    x[0, -2, 1, 1] = float("inf")
    return x


def assert_same_non_finite(actual, expected, dtype, names):
    """NaN for NaN, infinity for infinity, and finite values close, tensor by tensor."""
    assert actual[0].isnan().any(), "no NaN in the output"
    for name, a, b in zip(names, actual, expected):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), name
        if a.is_floating_point():
            assert_close(a.nan_to_num(0, 0, 0), b.nan_to_num(0, 0, 0), dtype, name)


def leaf_like(x):
    """``(input, leaf)``: a fresh leaf with ``x``'s values and the input to pass
    to a layer, a view of the leaf with ``x``'s strides when ``x`` is a strided
    view (a clone alone would be contiguous)."""
    if x._base is None or x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        leaf = x.detach().clone().requires_grad_()
        return leaf, leaf
    base = x._base
    assert base.is_contiguous() and base.storage_offset() == 0, "x must be a view of a contiguous tensor"
    leaf = base.detach().clone().requires_grad_()
    return leaf.as_strided(x.shape, x.stride(), x.storage_offset()), leaf


def run_and_compare(reference, candidate, x, *, train=True, steps=1):
    """Compare outputs, input and parameter gradients and buffers, over ``steps`` steps."""
    dtype = x.dtype
    reference.train(train)
    candidate.train(train)
    for step in range(steps):
        xr, xr_leaf = leaf_like(x)
        xc, xc_leaf = leaf_like(x)
        for p in (*reference.parameters(), *candidate.parameters()):
            p.grad = None
        yr, yc = reference(xr), candidate(xc)
        assert_close(yc, yr, dtype, f"step {step}: output")
        grad = torch.randn_like(yr)
        yr.backward(grad)
        yc.backward(grad)
        assert_close(xc_leaf.grad, xr_leaf.grad, dtype, f"step {step}: input gradient")
        for (name, pr), pc in zip(reference.named_parameters(), candidate.parameters()):
            assert_close(pc.grad, pr.grad, dtype, f"step {step}: gradient of {name}")
        for (name, br), bc in zip(reference.named_buffers(), candidate.buffers()):
            if br.is_floating_point():
                assert_close(bc, br, dtype, f"step {step}: buffer {name}")
            else:
                assert torch.equal(bc, br), f"step {step}: buffer {name}"


def check_against_truth(ours, theirs, truth, dtype):
    """Output, input gradient and each parameter's gradient of ``ours`` are
    within ``dtype``'s tolerance of float64 ``truth``, or at most twice as far
    from it as PyTorch's result ``theirs`` in the same precision."""
    def groups(results):
        return {"output": results[0], "input gradient": results[1],
                **{f"parameter gradient {k}": g for k, g in enumerate(results[2:])}}
    for (name, a), b, e in zip(groups(ours).items(), groups(theirs).values(), groups(truth).values()):
        tolerance = (LOW_PRECISION if name == "output" else LOW_PRECISION_GRADIENTS)[dtype]
        err, torch_err = relative_norm(a, e), relative_norm(b, e)
        assert err <= max(tolerance, 2 * torch_err), (
            f"{name}: relative error {err:.3g} (PyTorch in the same precision: {torch_err:.3g})")


def relative_norm(actual, expected):
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def forward_backward(layer, x, grad):
    """Output, input gradient and parameter gradients of one training step."""
    x = x.detach().clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    y = layer(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]
