"""Where each convolution and BatchNorm of a layer lives in its flat tensors.

A layer with ``N = channels`` channels in segments ``c_1 .. c_P``
(``n_i = |c_i|``), expansion ``K`` and ``M = bottlenecks`` bottlenecks per
update unit has, for each segment ``i`` in turn (``mid = K n_i``), these
convolutions and BatchNorms, in this order::

    convolution      weight shape             BatchNorm     channels
    shortcut_conv    (n_i, N, 1, 1)           shortcut_bn   n_i        (shortcut=True only)
    for m = 0 .. M-1 (module path bottlenecks.m.*):
      conv1          (mid, N if m == 0 else n_i, 1, 1)
                                              bn1           mid
      conv2          (mid, mid, 3, 3)         bn2           mid
      conv3          (n_i, mid, 1, 1)         bn3           n_i

* ``conv_weight`` holds every convolution's weight, each flattened in
  row-major order, concatenated in this order.
* ``bn_weight``, ``bn_bias``, ``running_mean``, ``running_var`` (and the
  per-channel statistics the op returns) hold every BatchNorm's channels,
  concatenated in the same order. ``num_batches_tracked`` holds one count per
  BatchNorm, in the same order.

The shortcut comes right before the first ``conv1`` (and ``shortcut_bn``
before the first ``bn1``), so the merged first GEMM of a segment,
``[W_shortcut; W_conv1]`` of shape ``(n_i + mid, N)``, and the statistics of
its output are each one contiguous slice (:meth:`ParameterLayout.first_gemm`,
:meth:`ParameterLayout.first_norms`).

Slots are packed without gaps, so a layer has exactly the parameters of its
modules, and a view can start anywhere: a 6-channel BatchNorm's float32
tensors start 8 bytes past a 16-byte boundary in every other unit. Library
kernels may read a tensor in :data:`ALIGNMENT_BYTES` vectors (cuDNN's
channels-last batch norm reads its weight, bias and running statistics so,
and faults with "misaligned address" elsewhere), so where PyTorch computes
on such a device (:func:`needs_alignment`) with a view that is not
:func:`aligned`, the layer hands it an aligned copy
(``gunn_ext.layers.AlignedBatchNorm2d``, ``UpdateUnits.split_views``).

This docstring is the specification. ``csrc/parameter_layout.h`` mirrors it
with the same names, offsets and argument checks for the C++ op, and the
Triton backend decodes its arguments with this class.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch

from . import conventions

__all__ = ["ALIGNED_DEVICE_TYPES", "ALIGNMENT_BYTES", "Slot", "ParameterLayout", "aligned",
           "alignment_step", "check_input", "needs_alignment", "layout_of"]

ALIGNMENT_BYTES = 16
# The device types whose library kernels need aligned tensors (the CPU's do not).
ALIGNED_DEVICE_TYPES = ("cuda",)


def aligned(t: torch.Tensor) -> bool:
    """Whether ``t`` starts on an :data:`ALIGNMENT_BYTES` boundary of its storage
    (whose own start, an allocation, is aligned)."""
    return t.storage_offset() * t.element_size() % ALIGNMENT_BYTES == 0


def needs_alignment(device: torch.device) -> bool:
    """Whether library kernels on ``device`` need aligned tensors."""
    return device.type in ALIGNED_DEVICE_TYPES


def alignment_step(t: torch.Tensor) -> int:
    """The elements of ``t``'s dtype in :data:`ALIGNMENT_BYTES` (at least 1)."""
    return max(1, ALIGNMENT_BYTES // t.element_size())


class Slot(NamedTuple):
    """``shape`` stored at ``offset .. offset + numel`` of a flat tensor; ``row``
    is its row in the table above (for a BatchNorm, its place in
    ``num_batches_tracked``)."""

    offset: int
    shape: tuple[int, ...]
    row: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """The view of ``flat`` this slot names."""
        return flat.narrow(0, self.offset, self.numel).view(self.shape)


@dataclass(frozen=True)
class ParameterLayout:
    """The layout above for one layer configuration (validated on construction)."""

    channels: int
    segments: tuple[int, ...]
    expansion: int
    bottlenecks: int
    shortcut: bool
    starts: tuple[int, ...] = field(init=False, repr=False)
    _unit_convs: tuple[int, ...] = field(init=False, repr=False)
    _unit_norms: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        segments = tuple(self.segments)
        if not segments or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in segments):
            raise ValueError(f"segments must be a non-empty sequence of ints >= 1, got {list(segments)}")
        for name in ("channels", "expansion", "bottlenecks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if sum(segments) != self.channels:
            raise ValueError(f"segments {list(segments)} sum to {sum(segments)} but there are "
                             f"{self.channels} channels")
        starts, convs, norms = [0], [0], [0]
        for n in segments:
            starts.append(starts[-1] + n)
            convs.append(convs[-1] + self._unit_conv_numel(n))
            norms.append(norms[-1] + self._unit_norm_channels(n))
        object.__setattr__(self, "segments", segments)
        object.__setattr__(self, "starts", tuple(starts[:-1]))
        object.__setattr__(self, "_unit_convs", tuple(convs))
        object.__setattr__(self, "_unit_norms", tuple(norms))

    # Sizes ---------------------------------------------------------------
    def mid(self, i: int) -> int:
        """Channels inside the bottlenecks of segment ``i``: ``K n_i``."""
        return self.expansion * self.segments[i]

    def _bottleneck_conv_numel(self, n: int, inputs: int) -> int:
        mid = self.expansion * n
        return mid * inputs + mid * mid * 9 + n * mid

    def _unit_conv_numel(self, n: int) -> int:
        first = self._bottleneck_conv_numel(n, self.channels)
        rest = self._bottleneck_conv_numel(n, n) * (self.bottlenecks - 1)
        return (n * self.channels if self.shortcut else 0) + first + rest

    def _unit_norm_channels(self, n: int) -> int:
        return (n if self.shortcut else 0) + (2 * self.expansion * n + n) * self.bottlenecks

    @property
    def conv_numel(self) -> int:
        """Length of ``conv_weight``."""
        return self._unit_convs[-1]

    @property
    def norm_channels(self) -> int:
        """Length of ``bn_weight``, ``bn_bias``, ``running_mean`` and ``running_var``."""
        return self._unit_norms[-1]

    @property
    def norms_per_unit(self) -> int:
        return int(self.shortcut) + 3 * self.bottlenecks

    @property
    def norm_count(self) -> int:
        """Number of BatchNorms: the length of ``num_batches_tracked``."""
        return len(self.segments) * self.norms_per_unit

    def has_shortcut(self, m: int) -> bool:
        """Whether bottleneck ``m``'s first GEMM also computes the shortcut."""
        return m == 0 and self.shortcut

    # Convolutions --------------------------------------------------------
    def _row(self, i: int, j: int) -> int:
        return i * self.norms_per_unit + j

    def shortcut_conv(self, i: int) -> Slot:
        return Slot(self._unit_convs[i], (self.segments[i], self.channels, 1, 1), self._row(i, 0))

    def _bottleneck_conv_offset(self, i: int, m: int) -> int:
        n = self.segments[i]
        offset = self._unit_convs[i] + (n * self.channels if self.shortcut else 0)
        if m > 0:
            offset += self._bottleneck_conv_numel(n, self.channels)
            offset += (m - 1) * self._bottleneck_conv_numel(n, n)
        return offset

    def conv1(self, i: int, m: int) -> Slot:
        inputs = self.channels if m == 0 else self.segments[i]
        return Slot(self._bottleneck_conv_offset(i, m), (self.mid(i), inputs, 1, 1),
                    self._row(i, int(self.shortcut) + 3 * m))

    def conv2(self, i: int, m: int) -> Slot:
        first = self.conv1(i, m)
        return Slot(first.offset + first.numel, (self.mid(i), self.mid(i), 3, 3), first.row + 1)

    def conv3(self, i: int, m: int) -> Slot:
        second = self.conv2(i, m)
        return Slot(second.offset + second.numel, (self.segments[i], self.mid(i), 1, 1), second.row + 1)

    def first_gemm(self, i: int, m: int) -> Slot:
        """``[W_shortcut; W_conv1]`` of bottleneck ``m`` as one matrix (``W_conv1`` alone
        unless :meth:`has_shortcut`)."""
        conv1 = self.conv1(i, m)
        if not self.has_shortcut(m):
            return Slot(conv1.offset, conv1.shape[:2], conv1.row)
        return Slot(self._unit_convs[i], (self.segments[i] + self.mid(i), self.channels), self._row(i, 0))

    # BatchNorms ----------------------------------------------------------
    def _norm(self, i: int, j: int) -> tuple[int, int]:
        """(channel offset, channels) of norm ``j`` of unit ``i`` (in the table's order)."""
        offset, n = self._unit_norms[i], self.segments[i]
        sizes = ([n] if self.shortcut else []) + [self.mid(i), self.mid(i), n] * self.bottlenecks
        return offset + sum(sizes[:j]), sizes[j]

    def _norm_slot(self, i: int, j: int) -> Slot:
        offset, size = self._norm(i, j)
        return Slot(offset, (size,), self._row(i, j))

    def shortcut_bn(self, i: int) -> Slot:
        return self._norm_slot(i, 0)

    def bn1(self, i: int, m: int) -> Slot:
        return self._norm_slot(i, int(self.shortcut) + 3 * m)

    def bn2(self, i: int, m: int) -> Slot:
        return self._norm_slot(i, int(self.shortcut) + 3 * m + 1)

    def bn3(self, i: int, m: int) -> Slot:
        return self._norm_slot(i, int(self.shortcut) + 3 * m + 2)

    def first_norms(self, i: int, m: int) -> Slot:
        """The channels of ``[shortcut_bn; bn1]`` of bottleneck ``m`` (``bn1`` alone unless
        :meth:`has_shortcut`): the statistics of the first GEMM's output."""
        bn1 = self.bn1(i, m)
        if not self.has_shortcut(m):
            return bn1
        return Slot(bn1.offset - self.segments[i], (self.segments[i] + self.mid(i),), self._row(i, 0))

    def norm_sizes(self) -> list[int]:
        """Channels of every BatchNorm, in order."""
        return [slot.shape[0] for *_, slot in self.modules()]

    # Walking the table ---------------------------------------------------
    def modules(self) -> Iterator[tuple[int, str, Slot, str, Slot]]:
        """``(i, conv path, conv slot, norm path, norm slot)`` of every row of the
        table, in order; the paths are relative to update unit ``i``."""
        for i in range(len(self.segments)):
            if self.shortcut:
                yield i, "shortcut_conv", self.shortcut_conv(i), "shortcut_bn", self.shortcut_bn(i)
            for m in range(self.bottlenecks):
                for k, (conv, norm) in enumerate(((self.conv1, self.bn1), (self.conv2, self.bn2),
                                                   (self.conv3, self.bn3))):
                    yield (i, f"bottlenecks.{m}.conv{k + 1}", conv(i, m),
                           f"bottlenecks.{m}.bn{k + 1}", norm(i, m))

    # Argument checks (the same as csrc/parameter_layout.h) ----------------
    def check_parameters(self, x: torch.Tensor, conv_weight: torch.Tensor, bn_weight: torch.Tensor,
                         bn_bias: torch.Tensor) -> None:
        """``x`` and the parameters against this layout; errors name the argument."""
        if x.dim() != 4:
            raise ValueError(f"x must be 4-D (batch, channels, height, width), got {x.dim()}-D")
        if x.shape[1] != self.channels:
            raise ValueError(f"segments {list(self.segments)} sum to {self.channels} but x has "
                             f"{x.shape[1]} channels")
        stats = conventions.stats_dtype(x.dtype)
        _check_vector("conv_weight", conv_weight, self.conv_numel, x, (x.dtype,))
        _check_vector("bn_weight", bn_weight, self.norm_channels, x, (x.dtype, stats))
        _check_vector("bn_bias", bn_bias, self.norm_channels, x, (x.dtype, stats))

    def check_statistic(self, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
        """A per-channel statistic (``running_mean``, ``running_var``, or the op's ``mean`` and ``var``)."""
        _check_vector(name, t, self.norm_channels, x, (x.dtype, conventions.stats_dtype(x.dtype)))

    def check_arguments(self, x: torch.Tensor, conv_weight: torch.Tensor, bn_weight: torch.Tensor,
                        bn_bias: torch.Tensor, running_mean: torch.Tensor | None,
                        running_var: torch.Tensor | None, training: bool) -> None:
        """All the forward op's tensors."""
        self.check_parameters(x, conv_weight, bn_weight, bn_bias)
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None and not training:
                raise ValueError(f"{name} is needed in eval mode (training=False), got None")
            if t is not None:  # checked in training too, where it is not read
                self.check_statistic(name, t, x)
        if training and x.shape[0] * x.shape[2] * x.shape[3] < 2:
            raise ValueError(f"expected more than 1 value per channel when training, got input of "
                             f"shape {tuple(x.shape)}")

    def check_backward_arguments(self, grad_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                 conv_weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                                 mean: torch.Tensor, var: torch.Tensor) -> None:
        """All the backward op's tensors."""
        self.check_parameters(x, conv_weight, bn_weight, bn_bias)
        self.check_statistic("mean", mean, x)
        self.check_statistic("var", var, x)
        for name, t in (("grad_y", grad_y), ("y", y)):
            _check_like_x(name, t, x)


def check_input(x: torch.Tensor) -> None:
    """The op's input ``x``, as ``check_input`` in ``csrc/gradual_update.cpp``."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (batch, channels, height, width), got {x.dim()}-D")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {list(x.shape)}")


def _check_like_x(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {list(x.shape)}, got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}")


def _check_vector(name: str, t: torch.Tensor, numel: int, x: torch.Tensor, dtypes) -> None:
    if t.dim() != 1 or t.shape[0] != numel:
        raise ValueError(f"{name} must be 1-D with {numel} values (see ParameterLayout), "
                         f"got shape {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dict.fromkeys(dtypes))
        raise TypeError(f"{name} has dtype {t.dtype}; expected {expected} for x of dtype {x.dtype}")


@functools.lru_cache(maxsize=256)
def layout_of(channels: int, segments: tuple[int, ...], expansion: int, bottlenecks: int,
              shortcut: bool) -> ParameterLayout:
    """The (cached) layout of a configuration."""
    return ParameterLayout(channels, tuple(segments), expansion, bottlenecks, shortcut)
