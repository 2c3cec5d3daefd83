"""The ``triton`` backend against the pure-PyTorch reference.

With a GPU the kernels run compiled on CUDA tensors. Without one they run on
CPU tensors through Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before anything imports triton, and importing torch's
compiler stack does. So a plain ``pytest`` run on a CPU machine runs this
module's kernel tests once more in a child process with the variable set
(``test_interpreted_suite``); the variable never leaks into the parent, where
the other test modules run. The interpreter is slow, hence the tiny shapes.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import (LAYER_CASES, LOW_PRECISION, TOLERANCE, assert_close, assert_same_non_finite,
                      check_against_truth, forward_backward, make_layer, make_non_finite, relative_norm,
                      run_and_compare, twin)
from gunn_ext import backends

pytestmark = [pytest.mark.skipif(not backends.INSTALL["triton_installed"], reason="triton is not installed"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUNS_KERNELS = DEVICE == "cuda" or INTERPRETED
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
kernels = pytest.mark.skipif(not RUNS_KERNELS, reason="runs in the interpreted child process")


@pytest.mark.skipif(RUNS_KERNELS, reason="the kernels run in this process")
def test_interpreted_suite():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-6000:] + result.stderr[-2000:]


# The shared cases, and the shortcut-free and SUNN variants of two of them.
CASES = {**LAYER_CASES,
         "P=N, no shortcut": dict(LAYER_CASES["P=N"], shortcut=False),
         "sunn": dict(LAYER_CASES["uneven"], kind="sunn")}
SHAPES = {"5x6": (2, 5, 6), "batch 1, 3x7": (1, 3, 7)}


def _input(channels, shape, dtype=torch.float32, channels_last=False, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(shape[0], channels, *shape[1:], dtype=dtype, device=DEVICE)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@kernels
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_reference(case, train):
    layer = make_layer(backend="reference", dtype=torch.float32, device=DEVICE, **CASES[case])
    shape = SHAPES["5x6"] if case in ("uneven", "sunn") else SHAPES["batch 1, 3x7"]
    x = _input(layer.channels, shape, channels_last=case == "bottlenecks=2")
    run_and_compare(layer, twin(layer, "triton"), x, train=train, steps=2 if train else 1)


@kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_segments_wider_than_a_program(monkeypatch, train):
    """Segments whose channels span several programs of the row-wise BN kernels."""
    from gunn_ext.triton_kernels import launch
    monkeypatch.setattr(launch, "ELEMENTWISE_CHANNELS", 16)
    layer = make_layer(channels=23, segments=[3, 20], backend="reference", dtype=torch.float32, device=DEVICE)
    run_and_compare(layer, twin(layer, "triton"), _input(23, SHAPES["5x6"]), train=train)


@kernels
def test_eval_bottlenecks_too_wide_for_the_fused_tail(monkeypatch):
    """Eval bottlenecks wider than the fused tail's tile run as separate GEMMs (here one of two)."""
    from gunn_ext.triton_kernels import launch
    monkeypatch.setattr(launch, "EVAL_TAIL_CHANNELS", 16)
    layer = make_layer(channels=16, segments=[4, 12], bottlenecks=2, backend="reference", dtype=torch.float32,
                       device=DEVICE)
    run_and_compare(layer, twin(layer, "triton"), _input(16, SHAPES["batch 1, 3x7"]), train=False)


@kernels
def test_output_layout_follows_input():
    layer = make_layer(channels=4, segments=2, backend="triton", dtype=torch.float32, device=DEVICE).eval()
    x = _input(4, (1, 3, 3))
    assert layer(x).is_contiguous()
    assert layer(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    strided = _input(8, (1, 3, 3))[:, ::2]
    assert_close(layer(strided), twin(layer, "reference")(strided), torch.float32, "strided input")


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_half_precision(dtype, train):
    """16-bit kernels (fp32 accumulation) are as close to float64 truth as PyTorch in the same dtype:
    output, input and parameter gradients, running statistics."""
    truth = make_layer(channels=6, segments=[2, 4], dtype=torch.float64, device=DEVICE).train(train)
    torch_lowp = twin(truth, "reference").to(dtype)
    triton_lowp = twin(truth, "triton").to(dtype)
    x = _input(6, (2, 4, 5), dtype=torch.float64)
    grad = torch.randn_like(x)
    expected = forward_backward(truth, x, grad)
    ours = forward_backward(triton_lowp, x.to(dtype), grad.to(dtype))
    assert all(t.dtype == dtype for t in ours), [t.dtype for t in ours]
    check_against_truth(ours, forward_backward(torch_lowp, x.to(dtype), grad.to(dtype)), expected, dtype)
    for (name, r), b in zip(truth.named_buffers(), triton_lowp.buffers()):
        if r.is_floating_point():
            assert relative_norm(b, r) <= LOW_PRECISION[dtype], f"buffer {name}"


@kernels
def test_deterministic():
    layer = make_layer(channels=8, segments=[3, 5], backend="triton", dtype=torch.float32, device=DEVICE)
    x = _input(8, (2, 3, 4))
    grads = []
    for _ in range(2):
        xx = x.clone().requires_grad_()
        layer(xx).square().sum().backward()
        grads.append(torch.cat([xx.grad.flatten()] + [p.grad.flatten() for p in layer.parameters()]))
        layer.zero_grad()
    assert torch.equal(grads[0], grads[1])


@kernels
def test_compile_fullgraph():
    layer = make_layer(channels=6, segments=[2, 4], backend="triton", dtype=torch.float32, device=DEVICE)
    twin_layer = twin(layer, "triton")
    compiled = torch.compile(twin_layer, fullgraph=True, backend="aot_eager")
    x = _input(6, (2, 3, 3))
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = layer(xe), compiled(xc)
    assert_close(yc, ye, torch.float32, "compiled output")
    ye.square().sum().backward()
    yc.square().sum().backward()
    assert_close(xc.grad, xe.grad, torch.float32, "compiled input gradient")


@kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    """Schema, autograd registration, and fake kernels whose outputs (strides
    included) match the real ones, also for a model moved to channels_last."""
    from gunn_ext import ops, triton_backend

    layer = make_layer(channels=4, segments=[1, 3], dtype=torch.float32, device=DEVICE)
    x = _input(4, (1, 3, 3)).requires_grad_()
    if layout == "channels_last":
        layer = layer.to(memory_format=torch.channels_last)
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    args = ops.layer_arguments(layer, x, training=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.gunn_ext.triton_gradual_update, args, test_utils=utils)
    y, mean, var = triton_backend.triton_gradual_update(*args)
    (x, convs, weights, biases, _, _, *config) = args
    torch.library.opcheck(torch.ops.gunn_ext.triton_gradual_update_backward,
                          (torch.randn_like(y), x.detach(), y.detach(), convs, weights, biases,
                           mean, var, *config), test_utils=("test_schema", "test_faketensor"))


@kernels
def test_rejects_float64():
    layer = make_layer(channels=4, segments=2, backend="triton", dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16.*float64"):
        layer(_input(4, (1, 2, 2), dtype=torch.float64))


@pytest.mark.skipif(INTERPRETED, reason="checked by the parent process")
def test_optional_dependency(monkeypatch):
    """Importing gunn_ext does not import triton; without it the backend is not offered."""
    code = "import sys, gunn_ext; assert 'triton' not in sys.modules, 'gunn_ext imported triton'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.setitem(backends.INSTALL, "triton_installed", False)
    assert "triton" not in backends.available_backends()
    assert "triton" not in backends.available_backends("cpu")


@kernels
def test_tolerances_are_tight_enough_to_fail():
    """A one-ulp-scale perturbation of a BN parameter is caught by the float32 comparison."""
    layer = make_layer(channels=4, segments=2, backend="reference", dtype=torch.float32, device=DEVICE)
    broken = twin(layer, "triton")
    with torch.no_grad():
        broken.norms()[-1].bias += 10 * TOLERANCE[torch.float32]
    with pytest.raises(AssertionError, match="output"):
        run_and_compare(layer, broken, _input(4, (1, 3, 3)), train=True)


@kernels
@pytest.mark.parametrize("block", [64, 4096], ids=["2 tiles a step", "every tile in one step"])
def test_statistics_over_many_row_tiles(monkeypatch, block):
    """BN statistics (GEMM epilogue partials) and BN-backward sums merged over 14 row tiles
    and two channel blocks."""
    from gunn_ext.triton_kernels import launch
    from gunn_ext.triton_kernels.update import Norms

    monkeypatch.setattr(launch, "PARTIALS_BLOCK", block)
    torch.manual_seed(0)
    rows, k, c = 13 * launch.BLOCK_M + 5, 16, 40
    a = torch.randn(rows, k, device=DEVICE) + 3.0  # a large mean: merging must not cancel
    w = torch.randn(c, k, 1, 1, device=DEVICE)
    weight, bias = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    norm = Norms(weight, bias, 1e-5).all.with_gradients()
    out = torch.empty(rows, c, device=DEVICE)
    ws = launch.stats_workspace(rows, c, DEVICE)
    launch.conv(a, launch.Weights.linear(w), out, launch.Image(rows, 1, rows), stats=ws)
    launch.finalize_stats(ws, rows, norm)

    pre = a.double() @ w.view(c, k).double().T
    mean, var = pre.mean(0), pre.var(0, unbiased=False)
    assert_close(out, pre, torch.float32, "GEMM output")
    assert_close(norm.mean, mean, torch.float32, "mean")
    assert_close(norm.var, var, torch.float32, "variance")
    assert_close(norm.shift, bias - mean * weight / (var + 1e-5).sqrt(), torch.float32, "shift")

    dy = torch.randn(rows, c, device=DEVICE)
    launch.finalize_grad(launch.bn_grad_partials(dy, out, norm), rows, norm, training=True)
    xhat = (pre - mean) / (var + 1e-5).sqrt()
    assert_close(norm.grad_bias, dy.double().sum(0), torch.float32, "sum(dy)")
    assert_close(norm.grad_weight, (dy.double() * xhat).sum(0), torch.float32, "sum(dy * xhat)")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter has nothing to tune")
def test_autotuning_restores_only_accumulated_outputs():
    """Timed runs of an accumulating launch get their output back; others are not copied."""
    from gunn_ext.triton_kernels.gemm import conv_bn_kernel
    tuner = conv_bn_kernel.fn  # under the flags of its optional inputs
    out = torch.zeros(3)
    for accumulate in (True, False):
        args = {"out_ptr": out, "ACCUMULATE": accumulate}
        tuner.pre_hook(args)
        out.add_(1.0)
        tuner.post_hook(args, exception=None)
        assert torch.equal(out, torch.zeros(3) if accumulate else torch.ones(3))
        tuner.pre_hook(args, reset_only=True)
    from gunn_ext.triton_kernels.gemm import input_grad_accumulate_kernel
    always = input_grad_accumulate_kernel.fn  # no ACCUMULATE flag: adds into out_ptr on every launch
    always.pre_hook({"out_ptr": out})
    out.add_(1.0)
    always.post_hook({"out_ptr": out}, exception=None)
    assert torch.equal(out, torch.ones(3))


@pytest.mark.skipif(INTERPRETED, reason="checked by the parent process")
def test_optional_flags_follow_the_arguments_given():
    """A kernel's flag is whether its optional argument is not None, passed by position or by name."""
    from gunn_ext.triton_kernels import tuning

    class Kernel:
        arg_names = ["x_ptr", "y_ptr", "HAS_Y"]

        def run(self, *args, **kwargs):
            return kwargs["HAS_Y"]

    flagged = tuning.optional_flags(HAS_Y="y_ptr")(Kernel())
    assert [flagged.run(1, None), flagged.run(1, 2)] == [False, True]
    assert [flagged.run(1, y_ptr=None), flagged.run(1, y_ptr=2)] == [False, True]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter has nothing to tune")
def test_autotuning_space_is_pruned():
    from gunn_ext.triton_kernels import tuning
    configs = lambda *a: [(c.num_warps, c.num_stages) for c in tuning.useful_configs(*a)]  # noqa: E731
    assert configs(64 * 32, 1) == [(4, 2)]
    assert configs(64 * 32, 8) == [(4, 2), (4, 3)]
    assert configs(64 * 32, 1, True) == [(4, 2), (8, 2)]
    assert configs(64 * 64, 1) == [(4, 2), (8, 2)]
    assert configs(64 * 128, 8) == [(4, 2), (4, 3), (8, 2), (8, 3)]


@kernels
def test_double_backward_raises():
    from test_errors import double_backward

    layer = make_layer(backend="triton", channels=4, segments=2, dtype=torch.float32, device=DEVICE)
    with pytest.raises(RuntimeError, match="triton_gradual_update_backward is not differentiable"):
        double_backward(layer, _input(4, SHAPES["batch 1, 3x7"]))


@kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["nan_weight", "inf_input"])
def test_non_finite_values_follow_the_reference(case, train):
    """A NaN weight or an infinite input gives the reference's NaN and infinity
    pattern in the output and every gradient: the ReLU's backward passes a NaN
    output's gradient, and the eval BN backward has no term in x."""
    layer = make_layer(backend="reference", channels=4, segments=2, dtype=torch.float32, device=DEVICE).train(train)
    x = make_non_finite(layer, _input(4, SHAPES["5x6"]), case)
    grad = torch.randn_like(x)
    ours, theirs = forward_backward(twin(layer, "triton"), x, grad), forward_backward(layer, x, grad)
    assert_same_non_finite(ours, theirs, torch.float32, ["y", "dx"] + [n for n, _ in layer.named_parameters()])


@kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nan_shows_in_the_output(train):
    """ReLU keeps NaN in the kernels, as torch.relu does."""
    layer = make_layer(backend="reference", channels=4, segments=2, dtype=torch.float32, device=DEVICE).train(train)
    with torch.no_grad():
        layer.units[1].bottlenecks[0].conv2.weight[0, 0, 1, 1] = float("nan")
    x = _input(4, SHAPES["5x6"])
    ours, theirs = twin(layer, "triton")(x), layer(x)
    assert ours.isnan().any() and torch.equal(ours.isnan(), theirs.isnan())


@kernels
def test_eval_backward_of_one_value_per_channel():
    """Eval reads running statistics, so one value per channel is legal there,
    in the backward too, as on the native op."""
    layer = make_layer(channels=4, segments=2, backend="reference", dtype=torch.float32, device=DEVICE).eval()
    run_and_compare(layer, twin(layer, "triton"), _input(4, (1, 1, 1)), train=False)
