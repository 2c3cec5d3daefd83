"""Implicit-GEMM convolutions over ``[rows, C]`` matrices with BatchNorm work fused.

Every activation is a row-major ``[rows, C]`` matrix, ``rows = B*H*W`` in
``(b, h, w)`` order (channels_last). A 1x1 convolution is the GEMM
``out = A @ B`` with ``B = W^T``; a 3x3 convolution (padding 1) is the same
GEMM summed over nine taps, tap ``t = 3 (dh + 1) + (dw + 1)`` reading ``A``
at the row ``r + dh W + dw`` (zero outside the image)::

    out[r, j] = sum_t sum_k A'[r + dh_t W + dw_t, k] B[t, k, j]      (written A' (*) B)

``A'`` is ``A`` after a prologue applied to each loaded tile, one of::

    none          A
    BN + ReLU     relu(A * scale + shift)                  BN + ReLU of the input
    BN backward   alpha * A + beta * (X - mean) + delta    A = dL/dbn(X) (ReLU-masked)

``B`` may be two stacked convolution weights (the merged shortcut + conv1
GEMM ``[W_s; W_1]``) read in place, the second one from index ``split`` of
``n`` (forward) or of ``k`` (input gradient).

One kernel per launch kind, composed of the device functions below; each has
a launcher of the same name without ``_kernel`` in :mod:`launch`::

    conv_kernel                   out = A' (*) B, A' = A or relu(bn(A)) (BN_RELU),
                                  optionally with the BN statistics of out (STATS)
    conv_bn_kernel                eval: out (+)= bn(A (*) B), ReLU on columns >= relu_from (RELU)
    input_grad_bn_relu_kernel     out = dL/dbn(X) of a conv whose input was relu(bn(X)):
                                  A' (*) B with the BN-backward prologue, zero where
                                  bn(X) <= 0, with the sums of bn(X)'s backward
    input_grad_accumulate_kernel  out += A' (*) B with the BN-backward prologue
    eval_bottleneck_tail_kernel   eval: the 3x3 conv, the last 1x1 conv and their BNs fused

An absent optional input is ``None``; a constexpr flag named for it
(``BN_RELU``, ``STACKED``, ``STATS``, ``RELU``, ``HAS_RESIDUAL``) says whether it
was given (:func:`tuning.optional_flags`), names the variant and keys its autotuning.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tuning import autotune, optional_flags


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with ``a`` rounded to ``b``'s dtype, fp32 accumulation.

    ``DOT_PRECISION = "upcast"`` multiplies the rounded operands in fp32 instead:
    the same products (a 16-bit product is exact in fp32), for Triton's
    interpreter, whose bfloat16 ``tl.dot`` is wrong.
    """
    a = a.to(b.dtype)
    if DOT_PRECISION == "upcast":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def tap_offsets(tap, TAPS: tl.constexpr):
    """``(dh, dw)`` of a tap: the centre for a 1x1 convolution."""
    if TAPS == 9:
        dh = tap // 3 - 1
        dw = tap % 3 - 1
    else:
        dh = tap * 0
        dw = tap * 0
    return dh, dw


@triton.jit
def batch_norm(v, scale_ptr, shift_ptr, cols):
    """``v * scale + shift`` per column (fp32; ``cols`` in range)."""
    scale = tl.load(scale_ptr + cols)  # [BLOCK_C]
    shift = tl.load(shift_ptr + cols)  # [BLOCK_C]
    return v * scale[None, :] + shift[None, :]


@triton.jit
def bn_backward(dy, x, alpha_ptr, beta_ptr, mean_ptr, delta_ptr, cols):
    """``dL/dx = alpha dy + beta (x - mean) + delta`` of ``dy = dL/dbn(x)`` (fp32; see :mod:`norm`).

    A channel with ``beta = 0`` (every channel in eval) has no term in ``x``, so
    that an infinite ``x`` gives ``alpha dy`` there, as PyTorch's eval backward does."""
    alpha = tl.load(alpha_ptr + cols)  # [BLOCK_C]
    beta = tl.load(beta_ptr + cols)
    mean = tl.load(mean_ptr + cols)
    delta = tl.load(delta_ptr + cols)
    centred = tl.where(beta[None, :] == 0.0, 0.0, beta[None, :] * (x - mean[None, :]))
    return alpha[None, :] * dy + centred + delta[None, :]


@triton.jit
def load_operand(a_ptr, a_stride, offs_m, offs_k, m_ok, K, H, W, dh, dw,
                 scale_ptr=None, shift_ptr=None,
                 x_ptr=None, x_stride=None, alpha_ptr=None, beta_ptr=None, mean_ptr=None, delta_ptr=None):
    """Tile ``A'[offs_m + dh W + dw, offs_k]``, ``[BLOCK_M, BLOCK_K]``, zero outside the image and past ``K``.

    The prologue follows the pointers given: BN + ReLU with ``scale_ptr``,
    BN backward of ``X`` (at ``x_ptr``, same rows) with ``x_ptr`` (both fp32);
    neither: ``A`` as stored.
    """
    h = (offs_m // W) % H + dh
    w = offs_m % W + dw
    row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    src = (offs_m + dh * W + dw).to(tl.int64)
    k_ok = offs_k < K
    mask = row_ok[:, None] & k_ok[None, :]
    a = tl.load(a_ptr + src[:, None] * a_stride + offs_k[None, :], mask=mask, other=0.0)  # [BLOCK_M, BLOCK_K]
    safe_k = tl.where(k_ok, offs_k, 0)
    if scale_ptr is not None:
        a = tl.maximum(batch_norm(a.to(tl.float32), scale_ptr, shift_ptr, safe_k), 0.0, tl.PropagateNan.ALL)
        a = tl.where(mask, a, 0.0)
    if x_ptr is not None:
        # [BLOCK_M, BLOCK_K]
        x = tl.load(x_ptr + src[:, None] * x_stride + offs_k[None, :], mask=mask, other=0.0)
        a = bn_backward(a.to(tl.float32), x.to(tl.float32), alpha_ptr, beta_ptr, mean_ptr, delta_ptr, safe_k)
        a = tl.where(mask, a, 0.0)
    return a


@triton.jit
def load_weights(w_ptr, w_second_ptr, split, tap, stride_tap, stride_k, stride_n, offs_k, offs_n, mask,
                 STACK_AXIS: tl.constexpr):
    """Tile ``B[tap, offs_k, offs_n]``, ``[BLOCK_K, BLOCK_N]``, zero where not ``mask``.

    With ``w_second_ptr``, ``B`` is two weights stacked along ``STACK_AXIS``
    (``"n"`` or ``"k"``), the second from index ``split``, both with the same strides.
    """
    if w_second_ptr is None:
        b = tl.load(w_ptr + tap * stride_tap + offs_k[:, None] * stride_k + offs_n[None, :] * stride_n,
                    mask=mask, other=0.0)
    else:
        if STACK_AXIS == "n":
            k2, n2 = offs_k, offs_n - split
            second = (offs_n >= split)[None, :]
        else:
            k2, n2 = offs_k - split, offs_n
            second = (offs_k >= split)[:, None]
        b = tl.load(w_ptr + tap * stride_tap + offs_k[:, None] * stride_k + offs_n[None, :] * stride_n,
                    mask=mask & ~second, other=0.0)
        b += tl.load(w_second_ptr + tap * stride_tap + k2[:, None] * stride_k + n2[None, :] * stride_n,
                     mask=mask & second, other=0.0)
    return b


@triton.jit
def conv_tile(a_ptr, a_stride, w_ptr, w_second_ptr, split, w_stride_tap, w_stride_k, w_stride_n,
              offs_m, offs_n, rows, K, N, H, W,
              TAPS: tl.constexpr, STACK_AXIS: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              scale_ptr=None, shift_ptr=None,
              x_ptr=None, x_stride=None, alpha_ptr=None, beta_ptr=None, mean_ptr=None, delta_ptr=None):
    """The fp32 tile ``(A' (*) B)[offs_m, offs_n]``, ``[BLOCK_M, BLOCK_N]``; the
    prologue as in :func:`load_operand`, ``B`` as in :func:`load_weights`."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_ok = offs_m < rows
    n_ok = offs_n < N
    for tap in tl.static_range(TAPS):
        dh, dw = tap_offsets(tap, TAPS)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            b = load_weights(w_ptr, w_second_ptr, split, tap, w_stride_tap, w_stride_k, w_stride_n, offs_k,
                             offs_n, (offs_k[:, None] < K) & n_ok[None, :], STACK_AXIS)  # [BLOCK_K, BLOCK_N]
            a = load_operand(a_ptr, a_stride, offs_m, offs_k, m_ok, K, H, W, dh, dw, scale_ptr, shift_ptr,
                             x_ptr, x_stride, alpha_ptr, beta_ptr, mean_ptr, delta_ptr)  # [BLOCK_M, BLOCK_K]
            acc = dot(a, b, acc, DOT_PRECISION)
    return acc


@triton.jit
def store_column_partials(ws0_ptr, ws1_ptr, v0, v1, pid_m, offs_n, n_ok, N):
    """Row ``pid_m`` of two ``[row tiles, N]`` workspaces: the column sums of ``v0`` and ``v1``."""
    tl.store(ws0_ptr + pid_m * N + offs_n, tl.sum(v0, axis=0), mask=n_ok)
    tl.store(ws1_ptr + pid_m * N + offs_n, tl.sum(v1, axis=0), mask=n_ok)


@triton.jit
def store_statistics_partials(sum_ptr, m2_ptr, out, mask, pid_m, offs_n, n_ok, rows, N,
                              BLOCK_M: tl.constexpr):
    """Per-tile column sum and sum of squares centred on the tile mean of the
    stored tile ``out`` (merged across tiles by ``norm.finalize_stats_kernel``)."""
    v = tl.where(mask, out.to(tl.float32), 0.0)  # [BLOCK_M, BLOCK_N]
    count = tl.minimum(rows - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    tile_mean = tl.sum(v, axis=0) / count
    centred = tl.where(mask, v - tile_mean[None, :], 0.0)
    store_column_partials(sum_ptr, m2_ptr, v, centred * centred, pid_m, offs_n, n_ok, N)


def gemm_autotune(*flags: str, accumulates: bool = False):
    """Autotuning of a GEMM kernel over ``[rows, N]`` tiles, keyed by its sizes and ``flags``."""
    return autotune(("BLOCK_M", "BLOCK_N"), lambda a: triton.cdiv(a["K"], a["BLOCK_K"]),
                    key=["rows", "K", "N", "TAPS", *flags, "DOT_PRECISION", "BLOCK_N", "BLOCK_K"],
                    accumulates_into="out_ptr" if accumulates else None)


@optional_flags(BN_RELU="a_scale_ptr", STACKED="w_second_ptr", STATS="sum_ptr")
@gemm_autotune("BN_RELU", "STACKED", "STATS")
@triton.jit
def conv_kernel(
        a_ptr, a_stride, a_scale_ptr, a_shift_ptr,
        w_ptr, w_second_ptr, split, w_stride_tap, w_stride_k, w_stride_n,
        out_ptr, out_stride, sum_ptr, m2_ptr,
        rows, K, N, H, W,
        TAPS: tl.constexpr, BN_RELU: tl.constexpr, STACKED: tl.constexpr, STATS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out = A' (*) B``, ``A' = relu(A * a_scale + a_shift)`` (BN_RELU) or ``A``; B stacked along ``n``
    (STACKED). STATS: the tile's BN statistics partials into ``sum_ptr``, ``m2_ptr`` ``[row tiles, N]``."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = conv_tile(a_ptr, a_stride, w_ptr, w_second_ptr, split, w_stride_tap, w_stride_k, w_stride_n,
                    offs_m, offs_n, rows, K, N, H, W, TAPS, "n", DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                    scale_ptr=a_scale_ptr, shift_ptr=a_shift_ptr)  # [BLOCK_M, BLOCK_N]
    n_ok = offs_n < N
    mask = (offs_m < rows)[:, None] & n_ok[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * out_stride + offs_n[None, :], out, mask=mask)
    if STATS:
        store_statistics_partials(sum_ptr, m2_ptr, out, mask, pid_m, offs_n, n_ok, rows, N, BLOCK_M)


@optional_flags(STACKED="w_second_ptr", RELU="relu_from")
@gemm_autotune("STACKED", "RELU", "ACCUMULATE", accumulates=True)
@triton.jit
def conv_bn_kernel(
        a_ptr, a_stride,
        w_ptr, w_second_ptr, split, w_stride_tap, w_stride_k, w_stride_n,
        out_ptr, out_stride, scale_ptr, shift_ptr, relu_from,
        rows, K, N, H, W,
        TAPS: tl.constexpr, STACKED: tl.constexpr, RELU: tl.constexpr, ACCUMULATE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Eval: ``out (+)= bn(A (*) B)``, ``bn(v) = v * scale + shift`` with the running statistics,
    ReLU on the columns ``>= relu_from`` (RELU), added to ``out`` (ACCUMULATE); B stacked along ``n``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = conv_tile(a_ptr, a_stride, w_ptr, w_second_ptr, split, w_stride_tap, w_stride_k, w_stride_n,
                    offs_m, offs_n, rows, K, N, H, W, TAPS, "n", DOT_PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_K)  # [BLOCK_M, BLOCK_N]
    n_ok = offs_n < N
    mask = (offs_m < rows)[:, None] & n_ok[None, :]
    acc = batch_norm(acc, scale_ptr, shift_ptr, tl.where(n_ok, offs_n, 0))
    if RELU:
        acc = tl.where(offs_n[None, :] >= relu_from, tl.maximum(acc, 0.0, tl.PropagateNan.ALL), acc)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@gemm_autotune()
@triton.jit
def input_grad_bn_relu_kernel(
        a_ptr, a_stride, a_x_ptr, a_x_stride, a_alpha_ptr, a_beta_ptr, a_mean_ptr, a_delta_ptr,
        w_ptr, w_stride_tap, w_stride_k, w_stride_n,
        out_ptr, out_stride, x_ptr, x_stride, x_mean_ptr, x_invstd_ptr, x_scale_ptr, x_shift_ptr,
        sum_dy_ptr, sum_dy_xhat_ptr,
        rows, K, N, H, W,
        TAPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The input gradient of a convolution whose input was ``relu(bn(X))``.

    ``A = dL/dbn(X_a)`` of the BN after the convolution (``X_a`` at ``a_x_ptr``),
    so ``A' (*) B`` with the BN-backward prologue is ``dL/d relu(bn(X))``; zeroed
    where ``bn(X) = X * x_scale + x_shift <= 0`` (a NaN passes, as in
    ``torch.relu``'s backward) it is ``dy = dL/dbn(X)``, stored to
    ``out``, with the tile's ``sum(dy)`` and ``sum(dy * xhat)``,
    ``xhat = (X - x_mean) * x_invstd``, into ``[row tiles, N]`` workspaces.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = conv_tile(a_ptr, a_stride, w_ptr, None, 0, w_stride_tap, w_stride_k, w_stride_n,
                    offs_m, offs_n, rows, K, N, H, W, TAPS, "k", DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                    x_ptr=a_x_ptr, x_stride=a_x_stride, alpha_ptr=a_alpha_ptr, beta_ptr=a_beta_ptr,
                    mean_ptr=a_mean_ptr, delta_ptr=a_delta_ptr)  # [BLOCK_M, BLOCK_N]
    n_ok = offs_n < N
    mask = (offs_m < rows)[:, None] & n_ok[None, :]
    safe_n = tl.where(n_ok, offs_n, 0)
    rows64 = offs_m.to(tl.int64)[:, None]
    out = acc.to(out_ptr.dtype.element_ty)
    # [BLOCK_M, BLOCK_N]
    x = tl.load(x_ptr + rows64 * x_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out = tl.where(batch_norm(x, x_scale_ptr, x_shift_ptr, safe_n) <= 0.0, 0.0, out).to(out.dtype)
    dy = tl.where(mask, out.to(tl.float32), 0.0)
    xhat = (x - tl.load(x_mean_ptr + safe_n)[None, :]) * tl.load(x_invstd_ptr + safe_n)[None, :]
    store_column_partials(sum_dy_ptr, sum_dy_xhat_ptr, dy, dy * xhat, pid_m, offs_n, n_ok, N)
    tl.store(out_ptr + rows64 * out_stride + offs_n[None, :], out, mask=mask)


@optional_flags(STACKED="w_second_ptr")
@gemm_autotune("STACKED", accumulates=True)
@triton.jit
def input_grad_accumulate_kernel(
        a_ptr, a_stride, a_x_ptr, a_x_stride, a_alpha_ptr, a_beta_ptr, a_mean_ptr, a_delta_ptr,
        w_ptr, w_second_ptr, split, w_stride_tap, w_stride_k, w_stride_n,
        out_ptr, out_stride,
        rows, K, N, H, W,
        TAPS: tl.constexpr, STACKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out += A' (*) B`` with the BN-backward prologue (``A = dL/dbn(X_a)``, ``X_a``
    at ``a_x_ptr``): the input gradient of a convolution whose input had no BN, added
    into a gradient buffer; B stacked along ``k`` (STACKED)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = conv_tile(a_ptr, a_stride, w_ptr, w_second_ptr, split, w_stride_tap, w_stride_k, w_stride_n,
                    offs_m, offs_n, rows, K, N, H, W, TAPS, "k", DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                    x_ptr=a_x_ptr, x_stride=a_x_stride, alpha_ptr=a_alpha_ptr, beta_ptr=a_beta_ptr,
                    mean_ptr=a_mean_ptr, delta_ptr=a_delta_ptr)  # [BLOCK_M, BLOCK_N]
    mask = (offs_m < rows)[:, None] & (offs_n < N)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
    acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@optional_flags(HAS_RESIDUAL="res_ptr")
@autotune(("BLOCK_M", "BLOCK_MID"), lambda a: triton.cdiv(a["MID"], a["BLOCK_K"]),
          key=["rows", "MID", "N", "HAS_RESIDUAL", "ACCUMULATE", "DOT_PRECISION", "BLOCK_MID", "BLOCK_K",
               "BLOCK_N"],
          accumulates_into="out_ptr")
@triton.jit
def eval_bottleneck_tail_kernel(
        a_ptr, a_stride,
        w2_ptr, w2_stride_tap, w2_stride_k, w2_stride_n, scale2_ptr, shift2_ptr,
        w3_ptr, w3_stride_k, w3_stride_n, scale3_ptr, shift3_ptr,
        res_ptr, res_stride, out_ptr, out_stride,
        rows, MID, N, H, W,
        HAS_RESIDUAL: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_MID: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr):
    """Eval: ``out (+)= res + bn3(relu(bn2(conv3x3(A))) @ W3^T)``, one row tile, all channels.

    ``bn(v) = v * scale + shift`` with the running statistics; ``res`` if HAS_RESIDUAL.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_mid = tl.arange(0, BLOCK_MID)
    mid_ok = offs_mid < MID
    acc = conv_tile(a_ptr, a_stride, w2_ptr, None, 0, w2_stride_tap, w2_stride_k, w2_stride_n,
                    offs_m, offs_mid, rows, MID, MID, H, W, 9, "n", DOT_PRECISION,
                    BLOCK_M, BLOCK_MID, BLOCK_K)  # [BLOCK_M, BLOCK_MID]
    act = batch_norm(acc, scale2_ptr, shift2_ptr, tl.where(mid_ok, offs_mid, 0))
    act = tl.where(mid_ok[None, :], tl.maximum(act, 0.0, tl.PropagateNan.ALL), 0.0)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w3 = tl.load(w3_ptr + offs_mid[:, None] * w3_stride_k + offs_n[None, :] * w3_stride_n,
                 mask=mid_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_MID, BLOCK_N]
    out = dot(act, w3, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION)
    out = batch_norm(out, scale3_ptr, shift3_ptr, tl.where(n_ok, offs_n, 0))
    mask = (offs_m < rows)[:, None] & n_ok[None, :]
    rows64 = offs_m.to(tl.int64)[:, None]
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + rows64 * res_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows64 * out_stride + offs_n[None, :]
    if ACCUMULATE:
        out += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
