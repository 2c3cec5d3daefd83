"""Host-side launchers: block sizes, grids, workspaces and operand descriptions.

One launcher per kernel, named after it (see :mod:`gemm`, :mod:`norm`,
:mod:`wgrad`): the convolutions are :func:`conv` (training forward and
recomputation), :func:`conv_bn` (eval), :func:`input_grad_bn_relu` and
:func:`input_grad_accumulate` (backward), :func:`weight_grad` and
:func:`eval_bottleneck_tail`. Operands are described by :class:`Weights`,
:class:`NormVectors` and the prologues :class:`BNRelu` and :class:`BNBackward`;
an absent optional input reaches its kernel as ``None``.

Block sizes are fixed by the problem (channel dims padded to a power of two
>= 16, row tiles of ``BLOCK_M``), so workspaces sized by the row tiling are
known before a launch; warps and pipeline stages are autotuned
(:mod:`tuning`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton

from .. import conventions

from .gemm import (conv_bn_kernel, conv_kernel, eval_bottleneck_tail_kernel, input_grad_accumulate_kernel,
                   input_grad_bn_relu_kernel)
from .norm import bn_add_kernel, bn_grad_partials_kernel, finalize_grad_kernel, finalize_stats_kernel
from .tuning import INTERPRETED
from .wgrad import weight_grad_kernel

BLOCK_M = 64
EVAL_TAIL_CHANNELS = 256  # most mid channels (K * n) the fused eval tail holds in one tile
EVAL_TAIL_BYTES = 128 * 1024  # most bytes of its [mid, n] conv3 weight tile (staged in shared memory)
ELEMENTWISE_CHANNELS = 256  # channels per program of the row-wise BN kernels
PARTIALS_BLOCK = 4096  # partials merged per step of a statistics kernel (BLOCK_T * BLOCK_C)
WGRAD_PROGRAMS = 512  # target number of weight-gradient programs (all chunks, taps, tiles)


def channel_block(c: int, cap: int = 128) -> int:
    return min(cap, max(16, triton.next_power_of_2(c)))


def k_block(k: int, taps: int, precision: str) -> int:
    """The reduction block of a GEMM: 32 where ``k`` allows, except where that
    makes ptxas spill on sm_90: a CUDA-core (``"ieee"``) dot holds a K slice of
    both operands per thread, and a 3x3 (nine taps) re-applies its prologue
    per tap (``tests/test_triton_compile.py`` checks the spills)."""
    return 16 if k <= 16 or taps > 1 or precision == "ieee" else 32


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow the float32 matmul precision (TF32 unless "highest" / "ieee");
    bfloat16 ones run as exact fp32 products under the interpreter (see ``gemm.dot``)."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return "upcast"
    if dtype == torch.float32 and not conventions.matmul_tf32():
        return "ieee"
    return "tf32"


@dataclass(frozen=True)
class Image:
    """Spatial size of the ``[rows, C]`` matrices: ``rows = batch * height * width``."""
    rows: int
    height: int
    width: int


@dataclass(frozen=True)
class Weights:
    """Operand ``B[tap, k, n]`` of a GEMM, as strides into a conv weight.

    ``second``: a weight stacked after ``tensor`` along its output channels
    (``[W_s; W_1]``), read in place from index ``split`` of axis ``stack_axis``
    (``"n"`` or ``"k"``).
    """
    tensor: torch.Tensor
    stride_tap: int
    stride_k: int
    stride_n: int
    k: int
    n: int
    taps: int
    second: torch.Tensor | None = None
    split: int = 0
    stack_axis: str | None = None

    @staticmethod
    def linear(w: torch.Tensor, second: torch.Tensor | None = None) -> Weights:
        """``B = [W; second]^T`` of 1x1 convs ``[out, in, 1, 1]``: ``in -> out``."""
        out, inp = w.shape[0], w.shape[1]
        if second is None:
            return Weights(w, 0, 1, inp, inp, out, 1)
        return Weights(w, 0, 1, inp, inp, out + second.shape[0], 1, second, out, "n")

    @staticmethod
    def linear_transposed(w: torch.Tensor, second: torch.Tensor | None = None) -> Weights:
        """``B = [W; second]`` of 1x1 convs: ``out -> in`` (input gradient)."""
        out, inp = w.shape[0], w.shape[1]
        if second is None:
            return Weights(w, 0, inp, 1, out, inp, 1)
        return Weights(w, 0, inp, 1, out + second.shape[0], inp, 1, second, out, "k")

    @staticmethod
    def conv3x3(w: torch.Tensor) -> Weights:
        """``B[t, ci, co] = W[co, ci, t]``."""
        co, ci = w.shape[0], w.shape[1]
        return Weights(w, 1, 9, 9 * ci, ci, co, 9)

    @staticmethod
    def conv3x3_transposed(w: torch.Tensor) -> Weights:
        """``B[t, co, ci] = W[co, ci, 8 - t]``: the input gradient as a 3x3 conv."""
        co, ci = w.shape[0], w.shape[1]
        return Weights(w.view(-1)[8:], -1, 9 * ci, 9, co, ci, 9)

    def arguments(self, stack_axis: str | None) -> tuple:
        """``(w_ptr, w_second_ptr, split, w_stride_tap, w_stride_k, w_stride_n)`` of a
        kernel whose stacked weights lie along ``stack_axis`` (None: it takes one weight)."""
        assert self.stack_axis in (None, stack_axis), f"weights stacked along {self.stack_axis}"
        stacked = (self.second, self.split) if stack_axis else ()
        return (self.tensor, *stacked, self.stride_tap, self.stride_k, self.stride_n)


@dataclass
class NormVectors:
    """Per-channel fp32 vectors of a run of BN channels (all norms packed, or a slice)."""
    weight: torch.Tensor
    bias: torch.Tensor
    eps: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    alpha: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    grad_weight: torch.Tensor | None = None
    grad_bias: torch.Tensor | None = None

    def slice(self, start: int, length: int) -> NormVectors:
        return NormVectors(**{f.name: None if getattr(self, f.name) is None
                              else getattr(self, f.name).narrow(0, start, length)
                              for f in dataclasses.fields(self)})

    def with_gradients(self) -> NormVectors:
        empty = [torch.empty_like(self.mean) for _ in range(5)]
        return dataclasses.replace(self, alpha=empty[0], beta=empty[1], delta=empty[2],
                                   grad_weight=empty[3], grad_bias=empty[4])


@dataclass(frozen=True)
class BNRelu:
    """Prologue ``relu(A * scale + shift)``."""
    norm: NormVectors


@dataclass(frozen=True)
class BNBackward:
    """Prologue ``alpha * A + beta * (x - mean) + delta``: BN backward of ``A = dL/dbn(x)``."""
    x: torch.Tensor
    norm: NormVectors


def _row_stride(t: torch.Tensor | None) -> int | None:
    return t.stride(0) if t is not None else None


def _bn_relu_arguments(prologue: BNRelu | None) -> tuple:
    """``(scale, shift)`` of a BN + ReLU prologue: ``(None, None)`` without one."""
    return (prologue.norm.scale, prologue.norm.shift) if prologue is not None else (None, None)


def row_tiles(rows: int) -> int:
    return triton.cdiv(rows, BLOCK_M)


def stats_workspace(rows: int, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ws = torch.empty((2, row_tiles(rows), channels), dtype=torch.float32, device=device)
    return ws[0], ws[1]


def _gemm_launch(a: torch.Tensor, b: Weights, image: Image) -> tuple[tuple[int, int], dict]:
    """Grid and compile-time tiling of a GEMM over ``b``: ``[BLOCK_M, BLOCK_N]`` output tiles."""
    precision = dot_precision(a.dtype)
    meta = dict(TAPS=b.taps, DOT_PRECISION=precision,
                BLOCK_M=BLOCK_M, BLOCK_N=channel_block(b.n), BLOCK_K=k_block(b.k, b.taps, precision))
    return (row_tiles(image.rows), triton.cdiv(b.n, meta["BLOCK_N"])), meta


def _sizes(b: Weights, image: Image) -> tuple[int, ...]:
    return image.rows, b.k, b.n, image.height, image.width


def _bn_backward_arguments(a: torch.Tensor, prologue: BNBackward) -> tuple:
    n = prologue.norm
    return a, a.stride(0), prologue.x, prologue.x.stride(0), n.alpha, n.beta, n.mean, n.delta


def conv(a: torch.Tensor, b: Weights, out: torch.Tensor, image: Image, *, prologue: BNRelu | None = None,
         stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``out = prologue(a) (*) b`` (see :mod:`gemm`); with ``stats`` (:func:`stats_workspace`),
    the per-tile partials of ``out``'s BN statistics too, for :func:`finalize_stats`."""
    grid, meta = _gemm_launch(a, b, image)
    sums = stats if stats is not None else (None, None)
    conv_kernel[grid](
        a, a.stride(0), *_bn_relu_arguments(prologue),
        *b.arguments("n"),
        out, out.stride(0), *sums,
        *_sizes(b, image), **meta)


def conv_bn(a: torch.Tensor, b: Weights, out: torch.Tensor, image: Image, *, bn: NormVectors,
            relu_from: int | None = None, accumulate: bool = False) -> None:
    """Eval: ``out (+)= bn(a (*) b)`` with ``bn``'s ``scale`` and ``shift``, ReLU on
    the columns from ``relu_from`` (none if None)."""
    grid, meta = _gemm_launch(a, b, image)
    conv_bn_kernel[grid](
        a, a.stride(0),
        *b.arguments("n"),
        out, out.stride(0), bn.scale, bn.shift, relu_from,
        *_sizes(b, image), ACCUMULATE=accumulate, **meta)


def input_grad_bn_relu(grad: torch.Tensor, b: Weights, out: torch.Tensor, image: Image, *,
                       prologue: BNBackward, x: torch.Tensor, x_bn: NormVectors,
                       sums: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``out = dL/dbn(x)`` of a convolution whose input was ``relu(x_bn(x))``, from
    ``grad = dL/dbn(prologue.x)`` after it; ``sums`` (:func:`stats_workspace`) get the
    per-tile ``sum(dy)`` and ``sum(dy * xhat)`` of ``x_bn``'s backward, for :func:`finalize_grad`."""
    grid, meta = _gemm_launch(grad, b, image)
    input_grad_bn_relu_kernel[grid](
        *_bn_backward_arguments(grad, prologue),
        *b.arguments(None),
        out, out.stride(0), x, x.stride(0), x_bn.mean, x_bn.invstd, x_bn.scale, x_bn.shift, *sums,
        *_sizes(b, image), **meta)


def input_grad_accumulate(grad: torch.Tensor, b: Weights, out: torch.Tensor, image: Image, *,
                          prologue: BNBackward) -> None:
    """``out += dL/d input`` of a convolution, from ``grad = dL/dbn(prologue.x)`` after it."""
    grid, meta = _gemm_launch(grad, b, image)
    input_grad_accumulate_kernel[grid](
        *_bn_backward_arguments(grad, prologue),
        *b.arguments("k"),
        out, out.stride(0),
        *_sizes(b, image), **meta)


def partials_blocks(tiles: int, channels: int) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_C)`` of a kernel merging ``[tiles, channels]`` partials:
    ``PARTIALS_BLOCK`` values a step (a merge over 1024 tiles is 8 vector loads),
    one program per 32 channels."""
    block_c = channel_block(channels, cap=32)
    return min(triton.next_power_of_2(tiles), max(1, PARTIALS_BLOCK // block_c)), block_c


def finalize_stats(ws: tuple[torch.Tensor, torch.Tensor], rows: int, norm: NormVectors) -> None:
    """Merge per-tile partials into ``norm.mean/var/invstd/scale/shift``."""
    channels, tiles = norm.mean.numel(), ws[0].shape[0]
    block_t, block_c = partials_blocks(tiles, channels)
    finalize_stats_kernel[(triton.cdiv(channels, block_c),)](
        ws[0], ws[1], tiles, channels, rows, BLOCK_M,
        norm.weight, norm.bias, norm.eps, norm.mean, norm.var, norm.invstd, norm.scale, norm.shift,
        BLOCK_T=block_t, BLOCK_C=block_c)


def finalize_grad(ws: tuple[torch.Tensor, torch.Tensor], rows: int, norm: NormVectors,
                  training: bool) -> None:
    """Parameter gradients and the BN-backward coefficients of ``norm``."""
    channels, tiles = norm.mean.numel(), ws[0].shape[0]
    block_t, block_c = partials_blocks(tiles, channels)
    finalize_grad_kernel[(triton.cdiv(channels, block_c),)](
        ws[0], ws[1], tiles, channels, rows,
        norm.weight, norm.invstd, norm.grad_weight, norm.grad_bias, norm.alpha, norm.beta, norm.delta,
        TRAINING=training, BLOCK_T=block_t, BLOCK_C=block_c)


def elementwise_launch(rows: int, channels: int) -> tuple[tuple[int, int], int]:
    """Grid and channel block of a row-wise BN kernel: ``BLOCK_M`` rows by up to
    ``ELEMENTWISE_CHANNELS`` channels a program."""
    block = channel_block(channels, cap=ELEMENTWISE_CHANNELS)
    return (row_tiles(rows), triton.cdiv(channels, block)), block


def bn_grad_partials(dy: torch.Tensor, x: torch.Tensor, norm: NormVectors):
    channels = x.shape[1]
    ws = stats_workspace(x.shape[0], channels, x.device)
    grid, block = elementwise_launch(x.shape[0], channels)
    bn_grad_partials_kernel[grid](
        dy, dy.stride(0), x, x.stride(0), norm.mean, norm.invstd, ws[0], ws[1], x.shape[0], channels,
        BLOCK_M=BLOCK_M, BLOCK_C=block)
    return ws


def bn_add(out: torch.Tensor, x1: torch.Tensor, norm1: NormVectors, *, accumulate: bool,
           x2: torch.Tensor | None = None, norm2: NormVectors | None = None) -> None:
    """``out = (out if accumulate) + bn1(x1) [+ bn2(x2) | + x2]``."""
    rows, channels = out.shape
    scale2, shift2 = (norm2.scale, norm2.shift) if norm2 is not None else (None, None)
    grid, block = elementwise_launch(rows, channels)
    bn_add_kernel[grid](
        out, out.stride(0), x1, x1.stride(0), norm1.scale, norm1.shift,
        x2, _row_stride(x2), scale2, shift2,
        rows, channels, ACCUMULATE=accumulate, BLOCK_M=BLOCK_M, BLOCK_C=block)


def weight_grad(d: BNBackward, d_rows: torch.Tensor, a: torch.Tensor, a_prologue: BNRelu | None,
                image: Image, taps: int) -> torch.Tensor:
    """``sum_r D'[r]^T A'[r + off_t]`` as fp32 ``[D, A, taps]``, a conv weight's layout."""
    nd, ka = d_rows.shape[1], a.shape[1]
    block_d, block_a = channel_block(nd, cap=64), channel_block(ka, cap=64)
    tiles = triton.cdiv(nd, block_d) * triton.cdiv(ka, block_a)
    chunks = max(1, min(row_tiles(image.rows), WGRAD_PROGRAMS // (taps * tiles)))
    rows_per_chunk = BLOCK_M * triton.cdiv(row_tiles(image.rows), chunks)
    chunks = triton.cdiv(image.rows, rows_per_chunk)
    ws = torch.empty((chunks, nd, ka, taps), dtype=torch.float32, device=a.device)
    weight_grad_kernel[(chunks, taps, tiles)](
        *_bn_backward_arguments(d_rows, d),
        a, a.stride(0), *_bn_relu_arguments(a_prologue),
        ws, image.rows, nd, ka, image.height, image.width, rows_per_chunk,
        TAPS=taps, DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_M=BLOCK_M, BLOCK_D=block_d, BLOCK_A=block_a)
    return ws.sum(0)


def fits_eval_tail(mid: int, n: int, dtype: torch.dtype) -> bool:
    """Whether the fused eval tail can hold a bottleneck of ``mid`` mid and ``n``
    output channels (float32 at expansion 1 with n > 128 is too large)."""
    tile = channel_block(mid, cap=EVAL_TAIL_CHANNELS) * channel_block(n, cap=EVAL_TAIL_CHANNELS)
    return mid <= EVAL_TAIL_CHANNELS and tile * dtype.itemsize <= EVAL_TAIL_BYTES


def eval_bottleneck_tail(act1: torch.Tensor, w2: torch.Tensor, norm2: NormVectors,
                         w3: torch.Tensor, norm3: NormVectors, out: torch.Tensor, image: Image, *,
                         residual: torch.Tensor | None, accumulate: bool) -> None:
    """``out (+)= residual + bn3(relu(bn2(conv3x3(act1, w2))) @ w3^T)``, eval BN."""
    mid, n = w2.shape[0], w3.shape[0]
    b2, b3 = Weights.conv3x3(w2), Weights.linear(w3)
    block_mid = channel_block(mid, cap=EVAL_TAIL_CHANNELS)
    assert fits_eval_tail(mid, n, act1.dtype), f"a bottleneck of {mid} -> {n} channels is too wide"
    precision = dot_precision(act1.dtype)
    eval_bottleneck_tail_kernel[(row_tiles(image.rows),)](
        act1, act1.stride(0), b2.tensor, b2.stride_tap, b2.stride_k, b2.stride_n, norm2.scale, norm2.shift,
        b3.tensor, b3.stride_k, b3.stride_n, norm3.scale, norm3.shift,
        residual, _row_stride(residual), out, out.stride(0),
        image.rows, mid, n, image.height, image.width, ACCUMULATE=accumulate,
        DOT_PRECISION=precision,
        BLOCK_M=BLOCK_M, BLOCK_MID=block_mid, BLOCK_K=k_block(mid, b2.taps, precision),
        BLOCK_N=channel_block(n, cap=EVAL_TAIL_CHANNELS))
