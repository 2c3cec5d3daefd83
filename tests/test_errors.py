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
    with pytest.raises(ValueError, match="more than 1 value per channel"):
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
    with pytest.raises(ValueError, match=r"segments \[3, 2\] sum to 5 but x has 6 channels"):
        torch.ops.gunn_ext.gradual_update(*args)
    args[6] = [3, 3]
    args[1] = args[1][:-1]
    with pytest.raises(ValueError, match=r"conv_weight must be 1-D with 756 values \(see ParameterLayout\), got shape \[755\]"):
        torch.ops.gunn_ext.gradual_update(*args)


def _op_arguments():
    from gunn_ext import ops
    layer = GUNNLayer(6, [2, 1, 3], shortcut=True)
    x = torch.randn(2, 6, 3, 3)
    args = list(ops.layer_arguments(layer, x, True))
    with torch.no_grad():
        y, mean, var = torch.ops.gunn_ext.gradual_update(*args)
    return args, [torch.randn_like(y), x, y, *(t.detach() for t in args[1:4]), mean, var, *args[6:]]


@pytest.mark.parametrize("index, name", [(1, "conv_weight"), (2, "bn_weight"), (4, "running_mean")])
def test_op_names_a_tensor_on_another_device(index, name):
    """A meta tensor among CPU ones sends the call to the fake kernel, which
    must raise as the op does rather than return empty memory (also in
    training, where the running statistics are not read)."""
    args, _ = _op_arguments()
    args[4], args[5] = torch.zeros(args[2].shape), torch.ones(args[2].shape)
    args[index] = args[index].detach().to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
        torch.ops.gunn_ext.gradual_update(*args)


@pytest.mark.parametrize("name", ["grad_y", "y"])
def test_backward_op_checks_grad_y_and_y(name):
    _, args = _op_arguments()
    index = 0 if name == "grad_y" else 2
    wrong = list(args)
    wrong[index] = args[index].double()
    with pytest.raises(TypeError, match=f"{name} has dtype torch.float64 but x has torch.float32|"
                                        f"{name} has dtype Double but x has Float"):
        torch.ops.gunn_ext.gradual_update_backward(*wrong)
    wrong[index] = args[index].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
        torch.ops.gunn_ext.gradual_update_backward(*wrong)
    wrong[index] = args[index][:, :, :2]
    with pytest.raises(ValueError, match=f"{name} must have the shape of x"):
        torch.ops.gunn_ext.gradual_update_backward(*wrong)


def test_a_layer_partly_on_meta_is_an_error():
    """A state dict loaded with assign=True into a meta layer leaves the missing
    tensors on meta: the layer raises instead of computing with them."""
    source = GUNNLayer(6, [2, 1, 3], shortcut=True)
    state = {k: v for k, v in source.state_dict().items() if "running" not in k}
    with torch.device("meta"):
        layer = GUNNLayer(6, [2, 1, 3], shortcut=True, backend="native")
    layer.load_state_dict(state, assign=True, strict=False)
    with pytest.raises(ValueError, match="running_mean is on meta but x is on cpu"):
        layer.eval()(torch.randn(2, 6, 3, 3))


def test_integer_arguments_may_be_numpy_integers():
    np = pytest.importorskip("numpy")
    layer = GUNNLayer(np.int64(12), np.array([5, 7]), expansion=np.int32(2), bottlenecks=np.int64(1))
    assert layer.segments == (5, 7) and all(type(v) is int for v in (layer.channels, *layer.segments,
                                                                       layer.expansion, layer.bottlenecks))
    assert GUNNLayer(12, np.int64(3)).segments == (4, 4, 4)
    with pytest.raises(ValueError, match="segments must hold ints >= 1"):
        GUNNLayer(12, np.array([6.0, 6.0]))


@pytest.mark.parametrize("value", [None, "1e-5", True])
def test_bad_eps_type_is_named(value):
    layer = GUNNLayer(4, 2)
    with pytest.raises(TypeError, match="eps must be a real number"):
        layer.eps = value
    assert layer.eps == 1e-5


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


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_fake_kernels_check_x_as_the_ops_do(backend):
    """On the meta device (the fake kernels) a layer is refused for the same
    input as on a real one, with the same message."""
    if backend == "triton" and not gunn_ext.backends.INSTALL["triton_installed"]:
        pytest.skip("triton is not installed")
    from gunn_ext import ops, triton_backend
    op = torch.ops.gunn_ext.gradual_update if backend == "native" else torch.ops.gunn_ext.triton_gradual_update
    layer = GUNNLayer(6, 2).to("meta")
    args = list(ops.layer_arguments(layer, torch.randn(2, 6, 3, 3, device="meta"), True))
    for x, error, message in ((args[0].long(), TypeError, "x must be floating point"),
                              (args[0][:0], ValueError, "x must not be empty")):
        with pytest.raises(error, match=message):
            op(x, *args[1:])
    wrong = list(args)
    wrong[6] = []
    with pytest.raises(ValueError, match="segments must be a non-empty sequence"):
        op(*wrong)
    if backend == "triton":
        double = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(TypeError, match="the triton backend supports float32, float16 and bfloat16"):
            op(*double)
        assert triton_backend.DTYPES == (torch.float32, torch.float16, torch.bfloat16)
