"""Module structure, state dicts, GUNN <-> SUNN conversion, backend selection."""
import io

import pytest
import torch
from torch import nn

import gunn_ext
from gunn_ext import GUNNLayer, SUNNLayer
from gunn_ext.reference import gradual_update_reference

from conftest import assert_close, assert_same_non_finite, forward_backward, make_layer, make_non_finite, twin


def test_standard_parameters():
    layer = GUNNLayer(12, [4, 8], expansion=3, bottlenecks=2, shortcut=True)
    assert isinstance(layer.units, nn.ModuleList) and len(layer.units) == 2
    unit = layer.units[1]
    assert isinstance(unit.bottlenecks, nn.ModuleList) and len(unit.bottlenecks) == 2
    b0, b1 = unit.bottlenecks
    assert b0.conv1.weight.shape == (24, 12, 1, 1)
    assert b0.conv2.weight.shape == (24, 24, 3, 3)
    assert b0.conv3.weight.shape == (8, 24, 1, 1)
    assert b1.conv1.weight.shape == (24, 8, 1, 1)
    assert unit.shortcut_conv.weight.shape == (8, 12, 1, 1)
    assert isinstance(unit.shortcut_bn, nn.BatchNorm2d)
    assert all(c.bias is None for c in layer.convs())
    assert not hasattr(GUNNLayer(12, 3).units[0], "shortcut_conv")


def test_parameter_count_equals_plain_layer():
    # Every unit reads all N channels: same parameters as the SUNN (plain) layer.
    gunn, sunn = GUNNLayer(240, 20, shortcut=True), SUNNLayer(240, 20, shortcut=True)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(gunn) == count(sunn) == 20 * (12 * 240 + 24 * 240 + 24 * 24 * 9 + 12 * 24 + 2 * (12 + 24 + 24 + 12))


def test_extra_repr():
    text = repr(GUNNLayer(10, [3, 7], expansion=3, bottlenecks=2, shortcut=True, backend="reference"))
    assert "channels=10, segments=[3, 7], expansion=3, bottlenecks=2, shortcut=True, backend='reference'" in text
    assert "segments=5," in repr(SUNNLayer(10, 5))


def test_paper_initialisation():
    layer = GUNNLayer(240, 20, shortcut=True)
    w = torch.cat([c.weight.flatten() for c in layer.convs() if c.kernel_size == (3, 3)])
    assert abs(w.std().item() - (2 / (9 * 24)) ** 0.5) < 0.01
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in layer.norms())
    assert all(torch.equal(n.bias, torch.zeros_like(n.bias)) for n in layer.norms())


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_gunn_and_sunn_state_dicts_interchange(backend):
    gunn = make_layer("gunn", channels=9, segments=[2, 7], bottlenecks=2, backend=backend)
    sunn = SUNNLayer(9, [2, 7], bottlenecks=2, shortcut=True, backend=backend).double()
    sd = gunn.state_dict()
    assert list(sd) == list(sunn.state_dict())
    assert all(sd[k].shape == v.shape for k, v in sunn.state_dict().items())
    sunn.load_state_dict(sd)
    x = torch.randn(2, 9, 3, 3, dtype=torch.float64)
    # SUNN with GUNN's weights: every unit reads x.
    expected = x.clone()
    for unit, (a, b) in zip(sunn.eval().units, sunn.bounds):
        expected[:, a:b] += unit(x)
    assert_close(sunn(x), expected, torch.float64, "SUNN output")


def test_state_dict_round_trip_across_backends():
    ref = make_layer(channels=8, segments=4)
    ref.train()(torch.randn(3, 8, 4, 4, dtype=torch.float64))  # move running stats
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    native = GUNNLayer(8, 4, shortcut=True, backend="native").double()
    native.load_state_dict(torch.load(buffer))
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    assert_close(native.eval()(x), ref.eval()(x), torch.float64, "eval output after round trip")


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_conversion_shares_weights(backend):
    sunn = make_layer("sunn", channels=6, segments=3, backend=backend).eval()
    gunn = GUNNLayer.from_sunn(sunn)
    assert isinstance(gunn, GUNNLayer) and gunn.units is sunn.units
    assert gunn.sequential and not sunn.sequential and gunn.backend == backend
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    assert_close(gunn(x), gradual_update_reference(gunn, x), torch.float64, "converted GUNN")
    back = SUNNLayer.from_gunn(gunn)
    assert isinstance(back, SUNNLayer) and back.units is sunn.units
    assert_close(back(x), sunn(x), torch.float64, "converted back")
    with pytest.raises(TypeError, match="layer must be a SUNNLayer, got GUNNLayer"):
        GUNNLayer.from_sunn(gunn)


def test_gunn_differs_from_sunn():
    gunn = make_layer("gunn", channels=6, segments=3).eval()
    sunn = SUNNLayer.from_gunn(gunn)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    yg, ys = gunn(x), sunn(x)
    assert torch.equal(yg[:, :2], ys[:, :2])  # the first segment reads the same state
    assert not torch.allclose(yg[:, 2:], ys[:, 2:])


def test_available_backends_and_auto():
    names = gunn_ext.available_backends()
    assert names[:2] == ["reference", "native"]
    assert gunn_ext.backends.resolve("auto", "cpu") == "native"
    layer = make_layer(channels=4, segments=2, backend="auto")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert_close(layer(x), twin(layer, "reference")(x), torch.float64, "auto")


def test_batchnorm_semantics_match_nn():
    """One unit, one segment, no shortcut == x + the Bottleneck's own modules."""
    layer = make_layer(channels=4, segments=1, shortcut=False, backend="native")
    bottleneck = twin(layer, "reference").units[0].bottlenecks[0]
    for bn in (*layer.norms(), *[m for m in bottleneck.modules() if isinstance(m, nn.BatchNorm2d)]):
        bn.momentum = 0.3
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    for _ in range(2):
        assert_close(layer.train()(x), x + bottleneck.train()(x), torch.float64, "train output")
    for ours, theirs in zip(layer.norms(), [bottleneck.bn1, bottleneck.bn2, bottleneck.bn3]):
        assert_close(ours.running_var, theirs.running_var, torch.float64, "running_var")
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 2
    assert_close(layer.eval()(x), x + bottleneck.eval()(x), torch.float64, "eval output")


@pytest.mark.parametrize("backend", ["native", "auto"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_behaves_as_nn(backend, train):
    """An empty batch gives an empty output and zero gradients; in training each
    norm counts the batch and keeps its running statistics, as nn.BatchNorm2d does."""
    layer = make_layer(channels=6, segments=3, backend=backend).train(train)
    reference = twin(layer, "reference").train(train)
    results = []
    for module in (layer, reference):
        x = torch.randn(0, 6, 4, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
        x.requires_grad_()
        y = module(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        results.append([y, x.grad, *[p.grad for p in module.parameters()], *module.buffers()])
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
    assert layer.units.num_batches_tracked.unique().tolist() == [1 if train else 0]
    assert layer.units.conv_weight.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_empty_image_is_a_clear_error(backend):
    layer = make_layer(channels=6, segments=3, backend=backend)
    with pytest.raises(ValueError, match=r"input must have height and width >= 1, got shape \(2, 6, 0, 3\)"):
        layer(torch.randn(2, 6, 0, 3, dtype=torch.float64))


def run_both(layer, x, train_step=True):
    """``forward_backward``'s results (or the output alone) and the buffers, of
    ``layer`` and of its reference twin."""
    grad = torch.randn_like(x)
    results = []
    for module in (layer, twin(layer, "reference")):
        out = forward_backward(module, x, grad) if train_step else [module(x)]
        results.append([*out, *module.buffers()])
    return results


def test_batchnorms_frozen_in_eval_inside_a_training_layer(monkeypatch):
    """The fine-tuning idiom (layer.train(), its BatchNorms .eval()) on every backend,
    and a layer whose norms differ runs on the reference, with one warning."""
    monkeypatch.setattr(gunn_ext.ops, "_warned", set())
    layer = make_layer(channels=6, segments=3, backend="native").train()
    for norm in layer.norms():
        norm.eval()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    ours, theirs = run_both(layer, x)
    for a, b in zip(ours, theirs):
        assert_close(a, b, torch.float64, "frozen norms")
    assert layer.units.num_batches_tracked.sum() == 0
    layer.norms()[0].train()
    with pytest.warns(RuntimeWarning, match="differ in training, track_running_stats"):
        ours, theirs = run_both(layer, x)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_track_running_stats_off():
    layer = make_layer(channels=6, segments=3, backend="native").train()
    for norm in layer.norms():
        norm.track_running_stats = False
    before = [b.clone() for b in layer.buffers()]
    ours, theirs = run_both(layer, torch.randn(2, 6, 4, 3, dtype=torch.float64))
    for a, b in zip(ours, theirs):
        assert_close(a, b, torch.float64, "track_running_stats=False")
    assert all(torch.equal(a, b) for a, b in zip(before, layer.buffers()))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nan_shows_in_the_output(train):
    """A NaN in a weight (a diverged model) reaches the output as in the reference:
    ReLU keeps NaN, as torch.relu does."""
    layer = make_layer(channels=6, segments=3, backend="native").train(train)
    with torch.no_grad():
        layer.units[1].bottlenecks[0].conv2.weight[0, 0, 1, 1] = float("nan")
    ours, theirs = run_both(layer, torch.randn(2, 6, 4, 3, dtype=torch.float64), train_step=False)
    assert ours[0].isnan().any()
    assert torch.equal(ours[0].isnan(), theirs[0].isnan())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("segments", [[3, 3], [6, 24]], ids=["whole_units", "library_units"])
@pytest.mark.parametrize("case", ["nan_weight", "inf_input"])
def test_non_finite_values_follow_the_reference(case, segments, train):
    """A NaN weight in the last unit, or an infinite input, gives the output,
    every gradient and the running statistics of the reference, NaN for NaN
    and infinity for infinity: the ReLU's backward passes a NaN output's
    gradient (it zeroes only where the output is <= 0, as torch.relu's does),
    the eval BN backward has no term in x, and a NaN variance stays NaN.
    (On a tiny image a library's 3x3 weight gradient can also multiply a NaN
    gradient by its zero padding, where the op's kernels leave the padding
    out.)"""
    channels = sum(segments)
    layer = make_layer(channels=channels, segments=segments, backend="native").train(train)
    x = make_non_finite(layer, torch.randn(2, channels, 7, 6, dtype=torch.float64), case)
    names = ["y", "dx"] + [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    assert_same_non_finite(*run_both(layer, x), torch.float64, names)


def test_bad_eps_is_a_clear_error():
    layer = make_layer(channels=6, segments=3, backend="native")
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    layer.eps = 0.0
    with pytest.raises(ValueError, match="eps must be positive with batch statistics, got 0.0"):
        layer.train()(x)
    layer.eval()(x)
    layer.eps = -1.0
    with pytest.raises(ValueError, match="eps must be non-negative, got -1.0"):
        layer(x)


def test_replacing_a_flat_buffer_rebinds_the_modules():
    layer = make_layer(channels=6, segments=3, backend="native").eval()
    layer.units.running_mean = torch.full_like(layer.running_mean, 0.5)
    assert torch.equal(layer.units[0].shortcut_bn.running_mean, torch.full((2,), 0.5, dtype=torch.float64))
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    assert_close(layer(x), twin(layer, "reference")(x), torch.float64, "replaced running_mean")


def test_mixed_norm_modes_under_torch_compile():
    layer = make_layer(channels=6, segments=3, backend="native").train()
    layer.norms()[1].eval()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    expected = twin(layer, "reference")(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), expected, torch.float64, "compiled, mixed norm modes")


def test_conversion_keeps_the_norms_modes():
    layer = make_layer(channels=6, segments=3, backend="native").train()
    for norm in layer.norms():
        norm.eval()
    plain = SUNNLayer.from_gunn(layer)
    assert plain.training and not any(norm.training for norm in layer.norms())
    assert GUNNLayer.from_sunn(plain.eval()).training is False


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_without_batch_counts(momentum):
    """num_batches_tracked set to None: no count, and a cumulative average stays put."""
    layer = make_layer(channels=6, segments=3, backend="native").train()
    for norm in layer.norms():
        norm.momentum = momentum
    layer.units.num_batches_tracked = None
    reference = twin(layer, "reference")
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    for _ in range(2):
        layer(x), reference(x)
    for ours, theirs in zip(layer.buffers(), reference.buffers()):
        assert_close(ours, theirs, torch.float64, "running statistics")
