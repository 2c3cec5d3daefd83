"""The paper's networks: exact parameter counts, structure, forward passes."""
import math

import pytest
import torch
from torch import nn

from gunn_ext import backends
from gunn_ext.layers import GUNNLayer, SUNNLayer
from gunn_ext.models import MODELS, build_model, gunn15, sunn15

# The counts the paper states (sections 5.2 and 5.3).
PAPER_PARAMETERS = [
    ("gunn15", 10, 1_585_746),
    ("gunn15", 100, 1_618_236),
    ("gunn24", 10, 29_534_106),
    ("gunn24", 100, 29_631_396),
    ("gunn18", 1000, 28_909_736),
    ("wide_gunn18", 1000, 45_624_936),
]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,num_classes,expected", PAPER_PARAMETERS)
def test_parameter_counts_match_the_paper(name, num_classes, expected):
    assert parameter_count(build_model(name, num_classes=num_classes)) == expected
    sunn_name = name.replace("gunn", "sunn")
    assert parameter_count(build_model(sunn_name, num_classes=num_classes)) == expected


@pytest.mark.parametrize("name", ["gunn15", "gunn24", "gunn18", "wide_gunn18"])
def test_gunn_and_sunn_have_identical_state_dict_keys(name):
    with torch.device("meta"):
        gunn = build_model(name)
        sunn = build_model(name.replace("gunn", "sunn"))
    gunn_shapes = {k: v.shape for k, v in gunn.state_dict().items()}
    sunn_shapes = {k: v.shape for k, v in sunn.state_dict().items()}
    assert gunn_shapes == sunn_shapes
    assert all(type(m) is GUNNLayer for m in gunn.segmented_layers())
    assert all(type(m) is SUNNLayer for m in sunn.segmented_layers())


@pytest.mark.parametrize("name,layers", [
    ("gunn15", [(240, 20, 2, 1), (300, 25, 2, 1), (360, 30, 2, 1)]),
    ("gunn24", [(720, 20, 3, 2), (900, 25, 3, 2), (1080, 30, 3, 2)]),
    ("gunn18", [(400, 10, 2, 1), (800, 20, 2, 1), (1600, 40, 2, 1), (2000, 50, 2, 1)]),
    ("wide_gunn18", [(1200, 30, 2, 1), (1600, 40, 2, 1), (2000, 50, 2, 1), (2000, 50, 2, 1)]),
])
def test_layer_configurations(name, layers):
    with torch.device("meta"):
        model = build_model(name)
    got = [(m.channels, len(m.segments), m.expansion, m.bottlenecks) for m in model.segmented_layers()]
    assert got == layers
    cifar = name.endswith(("15", "24"))
    assert all(m.shortcut == cifar for m in model.segmented_layers())


def test_backend_reaches_every_layer():
    with torch.device("meta"):
        model = sunn15(backend="reference")
    assert [m.backend for m in model.segmented_layers()] == ["reference"] * 3


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    model = gunn15()
    stem_1x1 = model.features.conv1[3]
    assert stem_1x1.kernel_size == (1, 1) and stem_1x1.out_channels == 240
    assert stem_1x1.weight.std().item() == pytest.approx(math.sqrt(2 / 240), rel=0.05)
    stem_3x3 = model.features.conv1[0]
    assert stem_3x3.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.1)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(model.fc.bias == 0)


def test_width_scales_channels_and_keeps_segments():
    model = gunn15(width=0.25, num_classes=7, in_channels=1)
    assert [(m.channels, len(m.segments)) for m in model.segmented_layers()] == [(60, 20), (75, 25), (90, 30)]
    assert model.features.conv1[0].in_channels == 1
    assert model.fc.out_features == 7


def test_segment_channels_resegments_every_layer():
    """P = N / n in every segmented layer. A segment's 3x3 (9 (K n)^2 weights) and
    last 1x1 (K n^2) shrink with n; at K = 2 a layer of N channels in segments
    of n holds (36 n + 2 n) N of them, from GUNN-15's n = 12 down to n = 1."""
    model = gunn15(segment_channels=1)
    assert [(m.channels, len(m.segments)) for m in model.segmented_layers()] == [(240, 240), (300, 300),
                                                                                  (360, 360)]
    assert all(set(m.segments) == {1} for m in model.segmented_layers())
    fewer = sum((36 + 2) * (12 - 1) * n for n in (240, 300, 360))
    assert parameter_count(model) == 1_585_746 - fewer
    assert parameter_count(sunn15(segment_channels=1)) == parameter_count(model)
    assert model.state_dict().keys() == sunn15(segment_channels=1).state_dict().keys()
    tiny = gunn15(width=0.25, segment_channels=5)
    assert [(m.channels, len(m.segments)) for m in tiny.segmented_layers()] == [(60, 12), (75, 15), (90, 18)]
    assert parameter_count(gunn15(segment_channels=12)) == 1_585_746
    with pytest.raises(ValueError, match="segment_channels=7 must divide the channels of every "
                                         "segmented layer, got a layer of 240"):
        gunn15(segment_channels=7)
    with pytest.raises(ValueError, match="segment_channels must be a positive int, got 0"):
        build_model("gunn15", segment_channels=0)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("factory", [gunn15, sunn15])
def test_cifar_forward_and_backward(factory, backend):
    if backend not in backends.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    torch.manual_seed(0)
    model = factory(num_classes=100, backend=backend)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 100)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_backends_agree_on_a_small_model():
    if "native" not in backends.available_backends("cpu"):
        pytest.skip("native backend is not available here")
    torch.manual_seed(0)
    reference = gunn15(width=0.1, backend="reference").double()
    native = gunn15(width=0.1, backend="native").double()
    native.load_state_dict(reference.state_dict())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(native(x), reference(x))


@pytest.mark.parametrize("name", ["gunn24", "gunn18"])
def test_big_models_run_at_tiny_width(name):
    model = build_model(name, width=0.05, num_classes=5)
    size = 32 if name == "gunn24" else 64
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_registry_and_errors():
    assert set(MODELS) == {"gunn15", "gunn24", "gunn18", "wide_gunn18",
                           "sunn15", "sunn24", "sunn18", "wide_sunn18"}
    with pytest.raises(ValueError, match=r"model must be one of .*got 'gunn16'"):
        build_model("gunn16")
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        gunn15(num_classes=0)
    for width in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"width must be a positive finite number, got {width}"):
            gunn15(width=width)
    with pytest.raises(ValueError, match="backend must be"):
        gunn15(backend="cudnn")
