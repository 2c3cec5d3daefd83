"""The parameter layout and the layers' flat storage behind their plain modules."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gunn_ext import GUNNLayer, SUNNLayer, ops, parameter_layout
from gunn_ext.parameter_layout import ParameterLayout, aligned

from conftest import assert_close, make_layer, twin

LAYOUTS = [
    dict(channels=6, segments=(6,), expansion=2, bottlenecks=1, shortcut=False),
    dict(channels=10, segments=(3, 1, 6), expansion=3, bottlenecks=2, shortcut=True),
    dict(channels=5, segments=(1,) * 5, expansion=1, bottlenecks=3, shortcut=True),
]


@pytest.mark.parametrize("config", LAYOUTS)
def test_slots_tile_the_flat_tensors_in_table_order(config):
    layout = ParameterLayout(**config)
    conv_end = norm_end = 0
    for row, (_, _, conv, _, norm) in enumerate(layout.modules()):
        assert conv.offset == conv_end and norm.offset == norm_end
        assert conv.row == norm.row == row
        conv_end, norm_end = conv.offset + conv.numel, norm.offset + norm.numel
    assert (conv_end, norm_end) == (layout.conv_numel, layout.norm_channels)
    assert row + 1 == layout.norm_count == len(layout.norm_sizes())


@pytest.mark.parametrize("config", LAYOUTS)
def test_first_gemm_is_shortcut_then_conv1(config):
    layout = ParameterLayout(**config)
    flat = torch.randn(layout.conv_numel)
    norms = torch.randn(layout.norm_channels)
    for i in range(len(layout.segments)):
        for m in range(layout.bottlenecks):
            parts = [layout.conv1(i, m)]
            norm_parts = [layout.bn1(i, m)]
            if layout.has_shortcut(m):
                parts.insert(0, layout.shortcut_conv(i))
                norm_parts.insert(0, layout.shortcut_bn(i))
            merged = torch.cat([p.of(flat).flatten(1) for p in parts])
            assert torch.equal(layout.first_gemm(i, m).of(flat), merged)
            assert torch.equal(layout.first_norms(i, m).of(norms),
                               torch.cat([p.of(norms) for p in norm_parts]))


@pytest.mark.parametrize("config, match", [
    (dict(channels=6, segments=(3, 2)), r"segments \[3, 2\] sum to 5 but there are 6 channels"),
    (dict(channels=6, segments=(6, 0)), "segments must be a non-empty sequence of ints >= 1"),
    (dict(channels=6, segments=(6,), bottlenecks=0), "bottlenecks must be a positive int, got 0"),
])
def test_layout_validation(config, match):
    with pytest.raises(ValueError, match=match):
        ParameterLayout(**{**dict(expansion=2, bottlenecks=1, shortcut=True), **config})


@pytest.mark.parametrize("segments", [2, 12])
def test_a_few_tensors_whatever_the_segments(segments):
    """Autograd, optimizers and DDP see three parameters and three buffers per layer,
    and the op takes a fixed number of tensors."""
    layer = GUNNLayer(12, segments, bottlenecks=2, shortcut=True)
    assert [n for n, _ in layer.named_parameters()] == ["units.conv_weight", "units.bn_weight",
                                                        "units.bn_bias"]
    assert [n for n, _ in layer.named_buffers()] == ["units.running_mean", "units.running_var",
                                                     "units.num_batches_tracked"]
    x = torch.randn(2, 12, 3, 3)
    assert sum(isinstance(a, torch.Tensor) for a in ops.layer_arguments(layer, x, True)) == 4
    assert sum(isinstance(a, torch.Tensor) for a in ops.layer_arguments(layer.eval(), x, False)) == 6


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def _native_step_ops(segments, momentum=0.1):
    layer = make_layer(channels=12, segments=segments, backend="native")
    for norm in layer.norms():
        norm.momentum = momentum
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64, requires_grad=True)
    with CountOps() as counter:
        layer(x).sum().backward()
    return counter.calls


@pytest.mark.parametrize("momentum", [0.1, None])
def test_host_tensor_work_does_not_grow_with_segments(momentum):
    """A native training step dispatches the same tensor operations (the op itself is
    one of them) at P = 2 and P = 12: the running-statistics update and the
    gradients are a few operations on flat tensors."""
    few, many = _native_step_ops(2, momentum), _native_step_ops(12, momentum)
    assert few == many
    assert "gunn_ext.gradual_update.default" in few and "gunn_ext.gradual_update_backward.default" in few
    assert len(few) < 40


def test_state_dict_keys_are_the_modules_own():
    layer = make_layer(channels=9, segments=[2, 7], bottlenecks=2)
    expected = []
    for name, module in layer.named_modules():
        if isinstance(module, nn.Conv2d):
            expected.append(f"{name}.weight")
        elif isinstance(module, nn.BatchNorm2d):
            expected += [f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                   "num_batches_tracked")]
    state = layer.state_dict()
    assert list(state) == expected
    unit = layer.units[1]
    assert torch.equal(state["units.1.shortcut_conv.weight"], unit.shortcut_conv.weight)
    assert torch.equal(state["units.1.bottlenecks.1.bn2.running_var"], unit.bottlenecks[1].bn2.running_var)


def _modules_share_flat_storage(layer):
    flat = layer.conv_weight.untyped_storage().data_ptr()
    norms = layer.bn_weight.untyped_storage().data_ptr()
    running = layer.running_mean.untyped_storage().data_ptr()
    return (all(c.weight.untyped_storage().data_ptr() == flat for c in layer.convs())
            and all(n.weight.untyped_storage().data_ptr() == norms for n in layer.norms())
            and all(n.running_mean.untyped_storage().data_ptr() == running for n in layer.norms()))


def test_load_state_dict_strict_reports_missing_and_unexpected_keys():
    layer = make_layer(channels=6, segments=2)
    state = layer.state_dict()
    del state["units.0.bottlenecks.0.conv2.weight"]
    state["units.0.bottlenecks.0.conv9.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as info:
        make_layer(channels=6, segments=2).load_state_dict(state)
    message = str(info.value)
    assert 'Missing key(s) in state_dict: "units.0.bottlenecks.0.conv2.weight"' in message
    assert 'Unexpected key(s) in state_dict: "units.0.bottlenecks.0.conv9.weight"' in message
    result = make_layer(channels=6, segments=2).load_state_dict(state, strict=False)
    assert result.missing_keys == ["units.0.bottlenecks.0.conv2.weight"]
    assert result.unexpected_keys == ["units.0.bottlenecks.0.conv9.weight"]
    state["units.0.bottlenecks.0.conv2.weight"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="size mismatch for units.0.bottlenecks.0.conv2.weight"):
        make_layer(channels=6, segments=2).load_state_dict(state, strict=False)


def test_load_state_dict_without_batch_counts_as_batch_norm():
    """As nn.BatchNorm2d: a state dict without num_batches_tracked loads strictly
    and leaves the counts where it has no version metadata (made by hand, or
    before the counter existed), and misses them where it has."""
    source, target = make_layer(channels=6, segments=2, seed=1), make_layer(channels=6, segments=2, seed=2)
    target.units.num_batches_tracked.fill_(7)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target.load_state_dict(state)
    assert torch.equal(target.running_var, source.running_var)
    assert target.units.num_batches_tracked.tolist() == [7] * target.units.layout.norm_count
    plain = nn.BatchNorm2d(3)
    plain.num_batches_tracked.fill_(7)
    plain.load_state_dict({k: v for k, v in nn.BatchNorm2d(3).state_dict().items() if k != "num_batches_tracked"})
    assert plain.num_batches_tracked.item() == 7

    versioned = source.state_dict()  # keeps its _metadata
    del versioned["units.1.bottlenecks.0.bn2.num_batches_tracked"]
    with pytest.raises(RuntimeError, match='Missing key.*"units.1.bottlenecks.0.bn2.num_batches_tracked"'):
        target.load_state_dict(versioned)
    plain_state = nn.BatchNorm2d(3).state_dict()
    del plain_state["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="Missing key"):
        plain.load_state_dict(plain_state)


def test_load_state_dict_copies_into_the_flat_storage():
    source = make_layer(channels=6, segments=3, seed=1)
    target = make_layer(channels=6, segments=3, seed=2)
    flat = target.conv_weight
    target.load_state_dict(source.state_dict())
    assert target.conv_weight is flat
    for name in ("conv_weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
        assert torch.equal(getattr(target, name), getattr(source, name)), name


def test_load_state_dict_assign_from_meta():
    source = make_layer(channels=6, segments=3, dtype=torch.float64)
    with torch.device("meta"):
        target = GUNNLayer(6, 3, shortcut=True, backend="native")
    target.load_state_dict(source.state_dict(), assign=True)
    assert target.conv_weight.device.type == "cpu" and target.conv_weight.dtype == torch.float64
    assert isinstance(target.conv_weight, nn.Parameter) and target.conv_weight.requires_grad
    assert _modules_share_flat_storage(target)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    assert_close(target.eval()(x), source.eval()(x), torch.float64, "output after assign")


@pytest.mark.parametrize("convert", ["double", "half", "to", "swap", "deepcopy", "save"])
def test_conversions_rebind_the_views(convert):
    layer = make_layer(channels=6, segments=3, dtype=torch.float32)
    if convert == "double":
        other = layer.double()
    elif convert == "swap":  # PyTorch's conversion for tensor subclasses, which views must not block
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            other = layer.double()
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
        assert other.conv_weight.dtype == torch.float64
    elif convert == "half":
        other = layer.half()
    elif convert == "to":
        other = layer.to(torch.float64)
    elif convert == "deepcopy":
        other = copy.deepcopy(layer)
        assert other.conv_weight.data_ptr() != layer.conv_weight.data_ptr()
    else:
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    assert _modules_share_flat_storage(other)
    assert all(c.weight.dtype == other.conv_weight.dtype for c in other.convs())
    assert len(list(other.parameters())) == 3


def test_a_module_called_alone_backpropagates_into_the_flat_parameter():
    layer = make_layer(channels=6, segments=3, dtype=torch.float32)
    conv = layer.units[1].bottlenecks[0].conv2
    slot = layer.layout.conv2(1, 0)
    conv(torch.randn(2, conv.in_channels, 4, 4)).square().sum().backward()
    grad = layer.conv_weight.grad
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[slot.offset:slot.offset + slot.numel] = True
    assert grad[inside].abs().sum() > 0 and not grad[~inside].any()


def _state_dict_is_the_flat_tensors(layer):
    state = layer.state_dict()
    return all(torch.equal(state[f"units.{key}"], layer.units._state_tensor(*entry))
               for key, *entry in layer.units._state_entries) and all(
        torch.equal(state[f"units.{key}"].flatten(), getattr(layer, name)[slot.offset:slot.offset + slot.numel])
        for key, _, _, name, slot in layer.units._state_entries if name != "num_batches_tracked")


def test_state_dict_follows_data_assigned_to_a_flat_tensor():
    """``vector_to_parameters`` replaces each parameter's ``.data``: checkpoints
    and loading follow the new storage, and so do the modules once rebound."""
    layer, source = make_layer(channels=6, segments=3, seed=1), make_layer(channels=6, segments=3, seed=2)
    nn.utils.vector_to_parameters(torch.arange(sum(p.numel() for p in layer.parameters()),
                                               dtype=torch.float64), layer.parameters())
    assert _state_dict_is_the_flat_tensors(layer)
    assert torch.equal(layer.state_dict()["units.0.shortcut_conv.weight"].flatten()[:3],
                       torch.arange(3, dtype=torch.float64))
    layer.load_state_dict(source.state_dict())
    for name in ("conv_weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
        assert torch.equal(getattr(layer, name), getattr(source, name)), name
    layer.units.bind_views()
    assert _modules_share_flat_storage(layer)


def test_the_state_dict_is_what_the_ops_compute_with():
    """A module's view given other data (``conv.weight.data = ...``) changes
    neither the layer's computation nor its checkpoint."""
    layer = make_layer(channels=6, segments=3)
    layer.units[0].bottlenecks[0].conv1.weight.data = torch.zeros(4, 6, 1, 1, dtype=torch.float64)
    assert _state_dict_is_the_flat_tensors(layer)
    assert layer.state_dict()["units.0.bottlenecks.0.conv1.weight"].abs().sum() > 0


def _remove_running_statistics(norms):
    """``nn.BatchNorm2d``'s recipe for batch statistics in eval."""
    for norm in norms:
        norm.track_running_stats = False
        norm.running_mean = norm.running_var = None


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_norms_without_running_statistics_use_batch_statistics_in_eval(backend):
    layer = make_layer(channels=6, segments=3, backend=backend).eval()
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        batch_stats = twin(layer, "reference").train()(x)
    running = layer.running_mean.clone()
    _remove_running_statistics(layer.norms())
    for other in (layer, copy.deepcopy(layer), layer.to(torch.float64)):
        assert all(n.running_mean is None and n.running_var is None for n in other.norms())
        assert_close(other(x), batch_stats, torch.float64, f"{backend} eval output")
        assert not any(k.endswith(("running_mean", "running_var")) for k in other.state_dict())
    assert torch.equal(layer.running_mean, running)


def test_norms_that_differ_in_having_running_statistics_run_on_the_reference():
    layer = make_layer(channels=6, segments=3, backend="native").eval()
    _remove_running_statistics(layer.norms()[:2])
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="having running statistics"):
        y = layer(x)
    assert_close(y, twin(layer, "reference")(x), torch.float64, "output")


def test_a_batch_is_counted_without_running_statistics():
    """``nn.BatchNorm2d`` counts a training batch whenever it tracks running
    statistics and has a count, with or without the statistics themselves."""
    layers = [make_layer(channels=6, segments=3, backend=b) for b in ("reference", "native")]
    for layer in layers:
        layer.units.running_mean = layer.units.running_var = None
        layer(torch.randn(4, 6, 3, 3, dtype=torch.float64))
        assert torch.equal(layer.num_batches_tracked, torch.ones_like(layer.num_batches_tracked))


def test_tensors_put_on_unit_modules_are_ignored_or_refused():
    """The flat tensors are the layer's state: a tensor set on a module is
    ignored by every backend, and a parameter registered on one is refused
    where it would be saved or computed with."""
    layer = make_layer(channels=6, segments=3).eval()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    expected, state = layer(x), layer.state_dict()
    norm = layer.units[0].bottlenecks[0].bn1
    norm.weight = None
    layer.units[1].bottlenecks[0].conv2.weight = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    for backend in ("reference", "native"):
        layer.backend = backend
        assert_close(layer(x), expected, torch.float64, backend)
    assert state.keys() == layer.state_dict().keys()
    layer.units[0].bottlenecks[0].conv1.weight = nn.Parameter(torch.zeros(4, 6, 1, 1, dtype=torch.float64))
    for call in (layer.state_dict, lambda: twin(layer, "reference")(x)):
        with pytest.raises(ValueError, match="was given its own 'weight'"):
            call()


def test_training_with_an_optimizer_across_backends():
    """Steps of SGD through the reference backend (modules, split views) and the
    native one (flat tensors) keep the two layers equal."""
    reference = make_layer(channels=6, segments=3, dtype=torch.float64)
    native = twin(reference, "native")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, native)]
    for _ in range(3):
        x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
        for layer, optimizer in zip((reference, native), optimizers):
            optimizer.zero_grad()
            layer(x).square().mean().backward()
            optimizer.step()
    for name in ("conv_weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
        assert_close(getattr(native, name), getattr(reference, name), torch.float64, name)
    assert torch.equal(native.num_batches_tracked, torch.full_like(native.num_batches_tracked, 3))
    assert _modules_share_flat_storage(reference)


def test_conversion_shares_the_flat_storage():
    gunn = make_layer(channels=6, segments=3, dtype=torch.float32)
    sunn = SUNNLayer.from_gunn(gunn)
    assert sunn.conv_weight is gunn.conv_weight and sunn.running_mean is gunn.running_mean
    gunn.double()
    assert sunn.conv_weight.dtype == sunn.running_var.dtype == torch.float64


def test_layer_eps_is_every_norms_eps():
    layer = make_layer(channels=6, segments=3)
    assert layer.eps == 1e-5
    layer.eps = 1e-3
    assert all(n.eps == 1e-3 for n in layer.norms())
    layer.norms()[2].eps = 1e-4
    with pytest.raises(ValueError, match=r"must share one eps, got \[0.0001, 0.001\]"):
        ops.layer_arguments(layer, torch.randn(2, 6, 3, 3, dtype=torch.float64), True)


# Alignment: PyTorch's batch norm only ever sees aligned tensors -------------
@pytest.fixture
def aligned_on_cpu(monkeypatch):
    """Aligned copies on the CPU too, as on CUDA."""
    monkeypatch.setattr(parameter_layout, "ALIGNED_DEVICE_TYPES", ("cpu",))


def _misaligned_layer(dtype):
    """A layer with norm views off the 16-byte boundary (odd segments)."""
    layer = make_layer(channels=12, segments=[5, 7], dtype=dtype)
    assert not all(aligned(t) for n in layer.norms() for t in (n.weight, n.running_mean))
    return layer


def _record_batch_norm(monkeypatch):
    """Every tensor ``F.batch_norm`` is given, as it is given."""
    seen, batch_norm = [], F.batch_norm

    def recording(input, running_mean, running_var, weight=None, bias=None, *args, **kwargs):
        seen.extend(t for t in (running_mean, running_var, weight, bias) if t is not None)
        return batch_norm(input, running_mean, running_var, weight, bias, *args, **kwargs)
    monkeypatch.setattr(F, "batch_norm", recording)
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batch_norm_sees_only_aligned_tensors(monkeypatch, aligned_on_cpu, dtype):
    """cuDNN reads a norm's tensors in 16-byte vectors: the reference and a norm
    called on its own hand PyTorch aligned ones, in training and in eval."""
    layer = _misaligned_layer(dtype)
    seen = _record_batch_norm(monkeypatch)
    x = torch.randn(2, 12, 3, 3, dtype=dtype, requires_grad=True)
    for train in (True, False):
        layer.train(train)
        layer(x).sum().backward()
        for norm in layer.norms():
            norm(torch.randn(2, norm.num_features, 3, 3, dtype=dtype))
    assert len(seen) == 2 * 2 * len(layer.norms()) * 4
    assert all(aligned(t) for t in seen)


def _train_and_evaluate(layer, x, grad):
    results = []
    for train in (True, True, False):
        layer.train(train)
        xi = x.clone().requires_grad_()
        for p in layer.parameters():
            p.grad = None
        layer(xi).backward(grad)
        results += [xi.grad, *(p.grad for p in layer.parameters()), *(b.clone() for b in layer.buffers())]
    return results


def test_aligned_copies_change_no_value(monkeypatch):
    """The reference with aligned copies gives bit for bit what it gives with the
    views themselves (the CPU's default): outputs, every gradient and the
    running statistics, over two training steps and one in eval."""
    layer = _misaligned_layer(torch.float32)
    plain = copy.deepcopy(layer)
    x, grad = torch.randn(4, 12, 5, 5), torch.randn(4, 12, 5, 5)
    theirs = _train_and_evaluate(plain, x, grad)
    monkeypatch.setattr(parameter_layout, "ALIGNED_DEVICE_TYPES", ("cpu",))
    ours = _train_and_evaluate(layer, x, grad)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_misaligned_norm_called_alone_is_nn_batch_norm(aligned_on_cpu, train):
    """A norm whose views need copies computes as ``nn.BatchNorm2d`` with its own
    tensors, and its gradients and running statistics land in the flat storage."""
    layer = _misaligned_layer(torch.float64)
    norm = next(n for n in layer.norms() if not aligned(n.weight))
    plain = nn.BatchNorm2d(norm.num_features, dtype=torch.float64)
    plain.load_state_dict({name: getattr(norm, name).clone() for name in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    x = torch.randn(3, norm.num_features, 4, 4, dtype=torch.float64)
    grad = torch.randn_like(x)
    results = []
    for module in (norm, plain):
        module.train(train)
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad)
        results.append([y, xi.grad])
    start = norm.weight.storage_offset() - layer.bn_weight.storage_offset()
    for flat, p in ((layer.bn_weight, plain.weight), (layer.bn_bias, plain.bias)):
        results[0].append(flat.grad[start:start + norm.num_features])
        results[1].append(p.grad)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(norm, name), getattr(plain, name)), name


def test_aligned_copies_under_torch_compile(aligned_on_cpu):
    """The reference's padded copies and the running statistics written back
    trace into one graph and give the eager results."""
    layer = _misaligned_layer(torch.float64)
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 12, 4, 3, dtype=torch.float64)
    assert_close(compiled(x), layer(x), torch.float64, "output")
    for name in ("running_mean", "running_var"):
        assert_close(getattr(compiled_layer, name), getattr(layer, name), torch.float64, name)


def test_no_copies_where_the_device_needs_none(monkeypatch):
    """On the CPU, PyTorch's batch norm computes with the views themselves."""
    layer = _misaligned_layer(torch.float32)
    seen = _record_batch_norm(monkeypatch)
    layer(torch.randn(2, 12, 3, 3)).sum().backward()
    layer.norms()[-1](torch.randn(2, layer.norms()[-1].num_features, 3, 3))
    flats = {t.untyped_storage().data_ptr()
             for t in (layer.bn_weight, layer.bn_bias, layer.running_mean, layer.running_var)}
    assert seen and all(t.untyped_storage().data_ptr() in flats for t in seen)


def test_a_lone_norm_under_torch_compile_computes_with_copies(aligned_on_cpu):
    """A trace cannot read a view's offset, so a norm called on its own hands
    batch norm copies of all its views there (backends other than inductor
    call PyTorch's kernel), and its running statistics still reach the flat
    storage."""
    layer = _misaligned_layer(torch.float32)
    norm = next(n for n in layer.norms() if not aligned(n.weight))
    plain = nn.BatchNorm2d(norm.num_features)
    plain.load_state_dict({name: getattr(norm, name).clone() for name in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module.graph)
        return graph_module.forward
    x = torch.randn(3, norm.num_features, 4, 4)
    assert torch.equal(torch.compile(norm, backend=record, fullgraph=True)(x), plain(x))
    calls = [n for n in graphs[0].nodes if "batch_norm" in str(n.target)]
    assert len(calls) == 1 and all(arg.target == "clone" for arg in calls[0].args[1:5])
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(norm, name), getattr(plain, name)), name
