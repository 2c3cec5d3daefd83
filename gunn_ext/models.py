"""The paper's networks: GUNN-15 and GUNN-24 (CIFAR), GUNN-18 and Wide GUNN-18
(ImageNet), and their SUNN baselines.

Every network is a stem, one segmented layer per resolution with a
transition between resolutions, and a classifier::

    CIFAR      conv3x3 3->64, BN, ReLU; conv1x1 64->N_1, BN, ReLU         (conv1)
               L_1 | conv1x1 N_1->N_2, BN, ReLU, avgpool 2x2 | L_2 | ...  (conv2, trans1, conv3, ...)
               conv1x1 N_L->N_L, BN, ReLU, global avgpool, fc             (head)
    ImageNet   conv7x7/2 3->64, BN, ReLU, maxpool 3x3/2; conv1x1 64->N_1, BN, ReLU
               L_1 | avgpool 2x2, conv1x1 N_1->N_2, BN, ReLU | L_2 | ...
               global avgpool, fc

where ``L_j`` is a GUNN (or SUNN) layer ``{N_j, P_j, K, M}``. CIFAR models
give every update unit a shortcut branch, ImageNet models do not.

A GUNN network and its SUNN counterpart have the same parameters (same
``state_dict`` keys and shapes); only the order of the updates differs.

``width`` scales every channel count (the stem's 64 included) and keeps the
number of segments, so segment sizes become ``max(1, round(w N_j / P_j))``.
``segment_channels = n`` then splits every segmented layer into segments of
``n`` channels (``P_j = N_j / n``; ``n = 1`` is the finest gradual update,
``P = N``). The convolutions that read the whole state (shortcut and first
1x1) keep their parameters, while a segment's 3x3 (``9 (K n)^2`` weights)
and last 1x1 (``K n^2``) shrink with ``n``: the network has fewer parameters
than the paper's.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .layers import GUNNLayer, SUNNLayer, init_paper, positive_int

__all__ = [
    "LayerSpec", "Architecture", "GUNNNet", "ARCHITECTURES", "MODELS", "build_model",
    "gunn15", "gunn24", "gunn18", "wide_gunn18", "sunn15", "sunn24", "sunn18", "wide_sunn18",
]


@dataclass(frozen=True)
class LayerSpec:
    """One segmented layer ``{N, P, K, M}``: channels, segments, expansion, bottlenecks."""

    channels: int
    segments: int
    expansion: int
    bottlenecks: int

    def scaled(self, width: float) -> LayerSpec:
        size = max(1, round(width * self.channels / self.segments))
        return LayerSpec(size * self.segments, self.segments, self.expansion, self.bottlenecks)

    def resegmented(self, segment_channels: int) -> LayerSpec:
        """The same layer in segments of ``segment_channels`` channels."""
        if self.channels % segment_channels:
            raise ValueError(f"segment_channels={segment_channels} must divide the channels of every "
                             f"segmented layer, got a layer of {self.channels}")
        return LayerSpec(self.channels, self.channels // segment_channels, self.expansion, self.bottlenecks)


@dataclass(frozen=True)
class Architecture:
    """A network family: ``cifar`` or ``imagenet`` layout and its layers."""

    layout: str
    layers: tuple[LayerSpec, ...]
    num_classes: int

    @property
    def shortcut(self) -> bool:
        return self.layout == "cifar"


ARCHITECTURES: dict[str, Architecture] = {
    "15": Architecture("cifar", (LayerSpec(240, 20, 2, 1), LayerSpec(300, 25, 2, 1),
                                 LayerSpec(360, 30, 2, 1)), 10),
    "24": Architecture("cifar", (LayerSpec(720, 20, 3, 2), LayerSpec(900, 25, 3, 2),
                                 LayerSpec(1080, 30, 3, 2)), 10),
    "18": Architecture("imagenet", (LayerSpec(400, 10, 2, 1), LayerSpec(800, 20, 2, 1),
                                    LayerSpec(1600, 40, 2, 1), LayerSpec(2000, 50, 2, 1)), 1000),
    "wide18": Architecture("imagenet", (LayerSpec(1200, 30, 2, 1), LayerSpec(1600, 40, 2, 1),
                                        LayerSpec(2000, 50, 2, 1), LayerSpec(2000, 50, 2, 1)), 1000),
}


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> list:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class GUNNNet(nn.Module):
    """A classifier built from an :class:`Architecture` with GUNN or SUNN layers.

    ``features`` holds the stages under the paper's names (``conv1`` the stem,
    ``conv2 ..`` the segmented layers, ``trans1 ..`` the transitions, ``head``);
    ``fc`` is the final linear layer.
    """

    def __init__(self, arch: Architecture, layer_type: type[GUNNLayer] | type[SUNNLayer],
                 num_classes: int | None = None, backend: str = "auto", width: float = 1.0,
                 in_channels: int = 3, segment_channels: int | None = None):
        super().__init__()
        if arch.layout not in ("cifar", "imagenet"):
            raise ValueError(f"arch.layout must be 'cifar' or 'imagenet', got {arch.layout!r}")
        num_classes = arch.num_classes if num_classes is None else num_classes
        num_classes = positive_int("num_classes", num_classes)
        in_channels = positive_int("in_channels", in_channels)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < math.inf:
            raise ValueError(f"width must be a positive finite number, got {width!r}")
        specs = [spec.scaled(width) for spec in arch.layers]
        if segment_channels is not None:
            segment_channels = positive_int("segment_channels", segment_channels)
            specs = [spec.resegmented(segment_channels) for spec in specs]
        stem_channels = max(1, round(64 * width))
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        if arch.layout == "cifar":
            stem = _conv_bn_relu(in_channels, stem_channels, 3)
        else:
            stem = _conv_bn_relu(in_channels, stem_channels, 7, stride=2)
            stem.append(nn.MaxPool2d(3, 2, 1))
        stages["conv1"] = nn.Sequential(*stem, *_conv_bn_relu(stem_channels, specs[0].channels, 1))
        for j, spec in enumerate(specs):
            if j > 0:
                transition = _conv_bn_relu(specs[j - 1].channels, spec.channels, 1)
                pool = nn.AvgPool2d(2)
                stages[f"trans{j}"] = nn.Sequential(
                    *(transition + [pool] if arch.layout == "cifar" else [pool] + transition))
            stages[f"conv{j + 2}"] = layer_type(
                spec.channels, spec.segments, expansion=spec.expansion, bottlenecks=spec.bottlenecks,
                shortcut=arch.shortcut, backend=backend)
        last = specs[-1].channels
        head = _conv_bn_relu(last, last, 1) if arch.layout == "cifar" else []
        stages["head"] = nn.Sequential(*head, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features = nn.Sequential(stages)
        self.fc = nn.Linear(last, num_classes)
        self.layout = arch.layout
        for module in [*stages.values(), self.fc]:
            if not isinstance(module, (GUNNLayer, SUNNLayer)):  # those initialise themselves
                init_paper(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def segmented_layers(self) -> list[GUNNLayer | SUNNLayer]:
        """The GUNN/SUNN layers, input to output."""
        return [m for m in self.features if isinstance(m, (GUNNLayer, SUNNLayer))]



def _factory(name: str, arch_key: str, layer_type, doc: str) -> Callable[..., GUNNNet]:
    arch = ARCHITECTURES[arch_key]

    def build(num_classes: int | None = None, backend: str = "auto", width: float = 1.0,
              in_channels: int = 3, segment_channels: int | None = None) -> GUNNNet:
        return GUNNNet(arch, layer_type, num_classes, backend, width, in_channels, segment_channels)

    build.__doc__ = (f"{doc} ({arch.layout}; {arch.num_classes} classes by default).\n\n"
                     "``backend`` goes to every segmented layer; ``width`` scales all channels; "
                     "``segment_channels`` (default: the paper's segments) sets the channels per segment.")
    build.__name__ = build.__qualname__ = name
    return build


gunn15 = _factory("gunn15", "15", GUNNLayer, "GUNN-15: 1,585,746 parameters for 10 classes, 1,618,236 for 100")
gunn24 = _factory("gunn24", "24", GUNNLayer, "GUNN-24: 29,534,106 parameters for 10 classes, 29,631,396 for 100")
gunn18 = _factory("gunn18", "18", GUNNLayer, "GUNN-18: 28,909,736 parameters")
wide_gunn18 = _factory("wide_gunn18", "wide18", GUNNLayer, "Wide GUNN-18: 45,624,936 parameters")
sunn15 = _factory("sunn15", "15", SUNNLayer, "SUNN-15, the GUNN-15 baseline with simultaneous updates")
sunn24 = _factory("sunn24", "24", SUNNLayer, "SUNN-24, the GUNN-24 baseline with simultaneous updates")
sunn18 = _factory("sunn18", "18", SUNNLayer, "SUNN-18, the GUNN-18 baseline with simultaneous updates")
wide_sunn18 = _factory("wide_sunn18", "wide18", SUNNLayer, "Wide SUNN-18, the Wide GUNN-18 baseline")

MODELS: dict[str, Callable[..., GUNNNet]] = {
    "gunn15": gunn15, "gunn24": gunn24, "gunn18": gunn18, "wide_gunn18": wide_gunn18,
    "sunn15": sunn15, "sunn24": sunn24, "sunn18": sunn18, "wide_sunn18": wide_sunn18,
}


def build_model(name: str, **kwargs) -> GUNNNet:
    """``MODELS[name](**kwargs)``; kwargs: num_classes, backend, width, in_channels, segment_channels."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](**kwargs)
