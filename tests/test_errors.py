"""Bad input gets a clear error that names the argument."""
import re

import pytest
import torch

import gunn_ext
from gunn_ext import GUNNLayer, SUNNLayer

BACKENDS = ["reference", "native"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=12, segments=5), "segments=5 must be a positive divisor of channels=12"),
    (dict(channels=12, segments=0), "segments=0"),
    (dict(channels=12, segments=[5, 5]), r"segment sizes \[5, 5\] sum to 10, expected channels=12"),
    (dict(channels=12, segments=[12, 0]), "segments must hold ints >= 1"),
    (dict(channels=12, segments=[]), "segments must be an int or a non-empty sequence"),
    (dict(channels=0, segments=1), "channels must be a positive int, got 0"),
    (dict(channels=12, segments=3, expansion=0), "expansion must be a positive int, got 0"),
    (dict(channels=12, segments=3, bottlenecks=1.5), "bottlenecks must be a positive int, got 1.5"),
    (dict(channels=12, segments=3, backend="cudnn"), "backend must be 'auto' or one of"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GUNNLayer(**kwargs)


def test_units_keyword_is_now_bottlenecks():
    with pytest.raises(TypeError, match="units= is now bottlenecks="):
        GUNNLayer(12, 3, units=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'unit'"):
        SUNNLayer(12, 3, unit=2)


def test_bad_shortcut_type():
    with pytest.raises(TypeError, match="shortcut must be a bool"):
        SUNNLayer(4, 2, shortcut="yes")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x, error, match", [
    (torch.randn(2, 5, 3, 3), ValueError, re.escape("input must have channels=6 (dim 1), got shape (2, 5, 3, 3)")),
    (torch.randn(6, 3, 3), ValueError, "input must be 4-D"),
    (torch.ones(2, 6, 3, 3, dtype=torch.int64), TypeError, "input must be a floating-point tensor, got dtype torch.int64"),
    (torch.randn(2, 6, 3, 3, dtype=torch.float64), TypeError, "input has dtype torch.float64 but the layer's parameters have dtype torch.float32"),
    ([[1.0]], TypeError, "input must be a torch.Tensor, got list"),
])
def test_bad_forward_input(backend, x, error, match):
    layer = GUNNLayer(6, 2, backend=backend)
    with pytest.raises(error, match=match):
        layer(x)


def test_device_mismatch_is_named():
    layer = GUNNLayer(6, 2, backend="native").to("meta")
    with pytest.raises(ValueError, match="input is on cpu but the layer's parameters are on meta"):
        layer(torch.randn(2, 6, 3, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_value_per_channel_in_training(backend):
    layer = GUNNLayer(4, 2, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1))
    layer.eval()(torch.randn(1, 4, 1, 1))  # fine in eval


def test_unknown_backend_lists_available():
    layer = GUNNLayer(4, 2)
    layer.backend = "nope"
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \['reference'.*got 'nope'"):
        layer(torch.randn(2, 4, 2, 2))


def test_unavailable_backend_on_device(monkeypatch):
    monkeypatch.setitem(gunn_ext.backends.INSTALL, "native_error", "not built (test)")
    with pytest.raises(ValueError, match=r"backend 'native' is not available on cpu: not built \(test\)"):
        gunn_ext.backends.resolve("native", "cpu")
    with pytest.warns(RuntimeWarning, match="native backend unavailable"):
        assert gunn_ext.backends.resolve("auto", "cpu") == "reference"


def test_op_checks_arguments():
    from gunn_ext import ops
    layer = GUNNLayer(6, 2)
    args = list(ops.layer_arguments(layer, torch.randn(2, 6, 3, 3), True))
    args[6] = [3, 2]
    with pytest.raises(RuntimeError, match=r"segments \[3, 2\] sum to 5 but x has 6 channels"):
        torch.ops.gunn_ext.gradual_update(*args)
    args[6] = [3, 3]
    args[1] = args[1][:-1]
    with pytest.raises(RuntimeError, match=r"conv_weight must be 1-D with 756 values \(see ParameterLayout\), got shape \[755\]"):
        torch.ops.gunn_ext.gradual_update(*args)


def double_backward(layer, x):
    """A gradient penalty: the second backward goes through the layer's backward."""
    x = x.clone().requires_grad_()
    grad_x, = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    return x.grad


def test_double_backward_raises_on_compiled_backends():
    """The reference differentiates twice; the compiled op says it cannot,
    instead of autograd's default of a warning and zero second-order terms."""
    layer = GUNNLayer(8, 4, backend="reference").double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    assert double_backward(layer, x).abs().sum() > 0
    layer.backend = "native"
    with pytest.raises(RuntimeError, match="gradual_update_backward is not differentiable: .*no double backward"):
        double_backward(layer, x)
    layer(x.requires_grad_()).sum().backward()  # create_graph=False is unaffected
