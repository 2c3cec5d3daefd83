"""GUNN and SUNN layers.

A layer holds ``N = channels`` channels split into ``P`` segments
``c_1 .. c_P``. Each segment has an update unit ``U_i`` that reads all ``N``
channels and writes ``|c_i|`` channels.

GUNN (gradually updated) applies the units one after another, in place::

    s_0 = x
    s_i = s_{i-1} + scatter_{c_i}(U_i(s_{i-1}))      i = 1 .. P
    y   = s_P

SUNN (simultaneously updated) is the baseline with the same units, all
reading the layer input: ``y[:, c_i] = x[:, c_i] + U_i(x)``.

Update unit (``units = M`` stacked bottlenecks, expansion ``K``, ``n = |c_i|``)::

    B_m(h) = bn3(conv1x1(relu(bn2(conv3x3(relu(bn1(conv1x1(h))))))))
             conv1: (N or n) -> K n,  conv2: K n -> K n,  conv3: K n -> n
    S(x)   = shortcut_bn(shortcut_conv(x))               N -> n (shortcut=True)
    h_1    = S(x) + B_1(x)            (without shortcut: h_1 = B_1(x))
    h_m    = h_{m-1} + B_m(h_{m-1})   m = 2 .. M
    U(x)   = h_M
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import backends

__all__ = ["Bottleneck", "UpdateUnit", "GUNNLayer", "SUNNLayer"]


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1 -> BN."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int):
        super().__init__()
        mid = expansion * out_channels
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))


class UpdateUnit(nn.Module):
    """The update ``U_i`` of one segment: ``in_channels -> out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int,
                 units: int, shortcut: bool):
        super().__init__()
        self.bottlenecks = nn.ModuleList(
            Bottleneck(in_channels if m == 0 else out_channels, out_channels, expansion)
            for m in range(units))
        if shortcut:
            self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(out_channels)

    @property
    def has_shortcut(self) -> bool:
        return hasattr(self, "shortcut_conv")

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        h = self.bottlenecks[0](state)
        if self.has_shortcut:
            h = h + self.shortcut_bn(self.shortcut_conv(state))
        for bottleneck in self.bottlenecks[1:]:
            h = h + bottleneck(h)
        return h

    def convs(self) -> list[nn.Conv2d]:
        """Convolutions in the order the compiled ops take them."""
        head = [self.shortcut_conv] if self.has_shortcut else []
        return head + [c for b in self.bottlenecks for c in (b.conv1, b.conv2, b.conv3)]

    def norms(self) -> list[nn.BatchNorm2d]:
        """BatchNorms in the same order as :meth:`convs`."""
        head = [self.shortcut_bn] if self.has_shortcut else []
        return head + [n for b in self.bottlenecks for n in (b.bn1, b.bn2, b.bn3)]


def _partition(channels: int, segments: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if isinstance(segments, bool):
        raise TypeError(f"segments must be an int or a sequence of ints, got {segments!r}")
    if isinstance(segments, int):
        if segments < 1 or channels % segments:
            raise ValueError(
                f"segments={segments} must be a positive divisor of channels={channels}; "
                "pass a sequence of segment sizes for an uneven partition")
        return (channels // segments,) * segments
    if not isinstance(segments, Sequence) or not segments:
        raise TypeError(f"segments must be an int or a non-empty sequence of ints, got {segments!r}")
    sizes = tuple(segments)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
        raise ValueError(f"segments must hold ints >= 1, got {list(sizes)}")
    if sum(sizes) != channels:
        raise ValueError(f"segment sizes {list(sizes)} sum to {sum(sizes)}, expected channels={channels}")
    return sizes


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def init_paper(module: nn.Module) -> None:
    """He initialisation as in the paper: conv ~ N(0, sqrt(2 / (k*k*out))), BN (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class _SegmentedLayer(nn.Module):
    sequential: bool

    def __init__(self, channels: int, segments: int | Sequence[int], expansion: int = 2,
                 units: int = 1, shortcut: bool = False, backend: str = "auto"):
        super().__init__()
        self.channels = channels
        self.segments = _partition(channels, segments)
        self.expansion = _positive_int("expansion", expansion)
        self.num_units = _positive_int("units", units)
        if not isinstance(shortcut, bool):
            raise TypeError(f"shortcut must be a bool, got {shortcut!r}")
        self.shortcut = shortcut
        self.backend = backends.check_name(backend)
        self.units = nn.ModuleList(
            UpdateUnit(channels, n, self.expansion, self.num_units, shortcut)
            for n in self.segments)
        init_paper(self)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` channel range of every segment."""
        out, start = [], 0
        for n in self.segments:
            out.append((start, start + n))
            start += n
        return out

    def convs(self) -> list[nn.Conv2d]:
        return [c for u in self.units for c in u.convs()]

    def norms(self) -> list[nn.BatchNorm2d]:
        return [n for u in self.units for n in u.norms()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backends.check_input(self, x)
        return backends.get(self.backend, x.device)(self, x)

    def extra_repr(self) -> str:
        segments = len(self.segments) if len(set(self.segments)) == 1 else list(self.segments)
        return (f"channels={self.channels}, segments={segments}, expansion={self.expansion}, "
                f"units={self.num_units}, shortcut={self.shortcut}, backend={self.backend!r}")

    def _convert(self, cls: type[_SegmentedLayer]) -> _SegmentedLayer:
        other = cls.__new__(cls)
        nn.Module.__init__(other)
        for name in ("channels", "segments", "expansion", "num_units", "shortcut", "backend"):
            setattr(other, name, getattr(self, name))
        other.units = self.units  # shared, not copied
        other.train(self.training)
        return other


class GUNNLayer(_SegmentedLayer):
    """Gradually updated layer: segment ``i`` is updated from the current state."""

    sequential = True

    @classmethod
    def from_sunn(cls, layer: SUNNLayer) -> GUNNLayer:
        """The GUNN layer that shares ``layer``'s units (the paper's conversion)."""
        if not isinstance(layer, SUNNLayer):
            raise TypeError(f"layer must be a SUNNLayer, got {type(layer).__name__}")
        return layer._convert(cls)


class SUNNLayer(_SegmentedLayer):
    """Simultaneously updated baseline: every unit reads the layer's input."""

    sequential = False

    @classmethod
    def from_gunn(cls, layer: GUNNLayer) -> SUNNLayer:
        """The SUNN layer that shares ``layer``'s units."""
        if not isinstance(layer, GUNNLayer):
            raise TypeError(f"layer must be a GUNNLayer, got {type(layer).__name__}")
        return layer._convert(cls)
