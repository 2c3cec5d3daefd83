"""Implicit-GEMM kernels over ``[rows, C]`` matrices with BatchNorm work fused.

Every activation is a row-major ``[rows, C]`` matrix, ``rows = B*H*W`` in
``(b, h, w)`` order (channels_last). A 1x1 convolution is the GEMM
``out = A @ B`` with ``B = W^T``; a 3x3 convolution (padding 1) is the same
GEMM summed over nine taps, tap ``t = 3 (dh + 1) + (dw + 1)`` reading ``A``
at the row ``r + dh W + dw`` (zero outside the image)::

    out[r, j] = sum_t sum_k A'[r + dh_t W + dw_t, k] B[t, k, j]

``A'`` is ``A`` after the prologue applied to each loaded tile:

    BN_RELU       relu(A * scale + shift)                  BN + ReLU of the input
    BN_BACKWARD   alpha * A + beta * (X - mean) + delta    BN backward of the gradient
                                                           A = dL/dbn(X) (ReLU-masked)

The epilogue works on the fp32 accumulator tile before (or after) it is stored:

    STATS          per-tile column sum and centred sum of squares of the stored
                   values (merged across tiles by ``norm.finalize_stats``)
    MASKED_GRAD    the tile is dL/d relu(bn(X)): mask it by ``bn(X) > 0``,
                   store it, and reduce sum(dy) and sum(dy * xhat) per column
    AFFINE         eval BatchNorm: ``acc * scale + shift`` per column
    ReLU on columns >= relu_from, accumulate into the output

``B`` may be two stacked convolution weights (the merged shortcut + conv1
GEMM ``[W_s; W_1]``) read in place: ``SPLIT`` 1 stacks them along ``n``
(forward), 2 along ``k`` (input gradient), the second one from index ``split``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tuning import autotune


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
def prologue(a, x, offs_k, p0_ptr, p1_ptr, p2_ptr, p3_ptr,
             BN_RELU: tl.constexpr, BN_BACKWARD: tl.constexpr):
    """``A'`` of a loaded tile (fp32); ``p*`` are per-column fp32 vectors."""
    a = a.to(tl.float32)
    if BN_RELU:
        scale = tl.load(p0_ptr + offs_k)
        shift = tl.load(p1_ptr + offs_k)
        a = tl.maximum(a * scale[None, :] + shift[None, :], 0.0)
    if BN_BACKWARD:
        alpha = tl.load(p0_ptr + offs_k)
        beta = tl.load(p1_ptr + offs_k)
        mean = tl.load(p2_ptr + offs_k)
        delta = tl.load(p3_ptr + offs_k)
        a = alpha[None, :] * a + beta[None, :] * (x.to(tl.float32) - mean[None, :]) + delta[None, :]
    return a


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
def load_operand(a_ptr, a_stride, x_ptr, x_stride, offs_m, offs_k, m_ok, K, H, W, dh, dw,
                 p0_ptr, p1_ptr, p2_ptr, p3_ptr,
                 BN_RELU: tl.constexpr, BN_BACKWARD: tl.constexpr):
    """Tile ``A'[offs_m + dh W + dw, offs_k]``, zero outside the image and past ``K``."""
    h = (offs_m // W) % H + dh
    w = offs_m % W + dw
    row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    src = (offs_m + dh * W + dw).to(tl.int64)
    k_ok = offs_k < K
    mask = row_ok[:, None] & k_ok[None, :]
    a = tl.load(a_ptr + src[:, None] * a_stride + offs_k[None, :], mask=mask, other=0.0)
    if BN_RELU or BN_BACKWARD:
        x = a
        if BN_BACKWARD:
            x = tl.load(x_ptr + src[:, None] * x_stride + offs_k[None, :], mask=mask, other=0.0)
        safe_k = tl.where(k_ok, offs_k, 0)
        a = prologue(a, x, safe_k, p0_ptr, p1_ptr, p2_ptr, p3_ptr, BN_RELU, BN_BACKWARD)
        a = tl.where(mask, a, 0.0)
    return a


@triton.jit
def load_weights(b_ptr, b2_ptr, split, tap, b_stride_tap, b_stride_k, b_stride_n, offs_k, offs_n, mask,
                 SPLIT: tl.constexpr):
    """Tile ``B[tap, offs_k, offs_n]`` (zero where not ``mask``)."""
    if SPLIT == 0:
        b = tl.load(b_ptr + tap * b_stride_tap + offs_k[:, None] * b_stride_k + offs_n[None, :] * b_stride_n,
                    mask=mask, other=0.0)
    else:
        if SPLIT == 1:
            k2, n2 = offs_k, offs_n - split
            second = (offs_n >= split)[None, :]
        else:
            k2, n2 = offs_k - split, offs_n
            second = (offs_k >= split)[:, None]
        b = tl.load(b_ptr + tap * b_stride_tap + offs_k[:, None] * b_stride_k + offs_n[None, :] * b_stride_n,
                    mask=mask & ~second, other=0.0)
        b += tl.load(b2_ptr + tap * b_stride_tap + k2[:, None] * b_stride_k + n2[None, :] * b_stride_n,
                     mask=mask & second, other=0.0)
    return b


@triton.jit
def conv_tile(a_ptr, a_stride, x_ptr, x_stride, b_ptr, b2_ptr, split, b_stride_tap, b_stride_k, b_stride_n,
              p0_ptr, p1_ptr, p2_ptr, p3_ptr, offs_m, offs_n, rows, K, N, H, W,
              TAPS: tl.constexpr, SPLIT: tl.constexpr, BN_RELU: tl.constexpr, BN_BACKWARD: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """The fp32 tile ``out[offs_m, offs_n]`` of the (implicit) GEMM."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    m_ok = offs_m < rows
    n_ok = offs_n < N
    for tap in tl.static_range(TAPS):
        dh, dw = tap_offsets(tap, TAPS)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            b = load_weights(b_ptr, b2_ptr, split, tap, b_stride_tap, b_stride_k, b_stride_n, offs_k, offs_n,
                             (offs_k[:, None] < K) & n_ok[None, :], SPLIT)
            a = load_operand(a_ptr, a_stride, x_ptr, x_stride, offs_m, offs_k, m_ok, K, H, W,
                             dh, dw, p0_ptr, p1_ptr, p2_ptr, p3_ptr, BN_RELU, BN_BACKWARD)
            acc = dot(a, b, acc, DOT_PRECISION)
    return acc


@triton.jit
def store_column_partials(ws0_ptr, ws1_ptr, v0, v1, pid_m, offs_n, n_ok, N):
    tl.store(ws0_ptr + pid_m * N + offs_n, tl.sum(v0, axis=0), mask=n_ok)
    tl.store(ws1_ptr + pid_m * N + offs_n, tl.sum(v1, axis=0), mask=n_ok)


@autotune(("BLOCK_M", "BLOCK_N"), lambda a: triton.cdiv(a["K"], a["BLOCK_K"]),
          key=["rows", "K", "N", "TAPS", "SPLIT", "BN_RELU", "BN_BACKWARD", "AFFINE", "RELU", "ACCUMULATE",
               "STATS", "MASKED_GRAD", "BLOCK_N", "BLOCK_K"], accumulates_into="c_ptr")
@triton.jit
def fused_gemm_kernel(
        a_ptr, a_stride, x_ptr, x_stride,
        b_ptr, b2_ptr, split, b_stride_tap, b_stride_k, b_stride_n,
        c_ptr, c_stride,
        p0_ptr, p1_ptr, p2_ptr, p3_ptr,
        scale_ptr, shift_ptr, relu_from,
        e_ptr, e_stride, e_mean_ptr, e_invstd_ptr, e_scale_ptr, e_shift_ptr,
        ws0_ptr, ws1_ptr,
        rows, K, N, H, W,
        TAPS: tl.constexpr, SPLIT: tl.constexpr, BN_RELU: tl.constexpr, BN_BACKWARD: tl.constexpr,
        AFFINE: tl.constexpr, RELU: tl.constexpr, ACCUMULATE: tl.constexpr,
        STATS: tl.constexpr, MASKED_GRAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``C (+)= epilogue(A' @ B)`` for one ``[BLOCK_M, BLOCK_N]`` tile; see the module doc.

    MASKED_GRAD reads ``X`` from ``e_ptr`` and its BN from ``e_*``: the ReLU mask
    is ``X * scale + shift > 0`` and ``xhat = (X - mean) * invstd``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = conv_tile(a_ptr, a_stride, x_ptr, x_stride, b_ptr, b2_ptr, split, b_stride_tap, b_stride_k,
                    b_stride_n, p0_ptr, p1_ptr, p2_ptr, p3_ptr, offs_m, offs_n, rows, K, N, H, W,
                    TAPS, SPLIT, BN_RELU, BN_BACKWARD, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    m_ok = offs_m < rows
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    safe_n = tl.where(n_ok, offs_n, 0)
    rows64 = offs_m.to(tl.int64)[:, None]
    if AFFINE:
        acc = acc * tl.load(scale_ptr + safe_n)[None, :] + tl.load(shift_ptr + safe_n)[None, :]
    if RELU:
        acc = tl.where(offs_n[None, :] >= relu_from, tl.maximum(acc, 0.0), acc)
    c_ptrs = c_ptr + rows64 * c_stride + offs_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = acc.to(c_ptr.dtype.element_ty)
    if MASKED_GRAD:
        x = tl.load(e_ptr + rows64 * e_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(e_scale_ptr + safe_n)
        shift = tl.load(e_shift_ptr + safe_n)
        out = tl.where(x * scale[None, :] + shift[None, :] > 0.0, out, 0.0).to(out.dtype)
        dy = tl.where(mask, out.to(tl.float32), 0.0)
        xhat = (x - tl.load(e_mean_ptr + safe_n)[None, :]) * tl.load(e_invstd_ptr + safe_n)[None, :]
        store_column_partials(ws0_ptr, ws1_ptr, dy, dy * xhat, pid_m, offs_n, n_ok, N)
    tl.store(c_ptrs, out, mask=mask)
    if STATS:
        v = tl.where(mask, out.to(tl.float32), 0.0)
        count = tl.minimum(rows - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        tile_mean = tl.sum(v, axis=0) / count
        centred = tl.where(mask, v - tile_mean[None, :], 0.0)
        store_column_partials(ws0_ptr, ws1_ptr, v, centred * centred, pid_m, offs_n, n_ok, N)


@autotune(("BLOCK_M", "BLOCK_MID"), lambda a: triton.cdiv(a["MID"], a["BLOCK_K"]),
          key=["rows", "MID", "N", "HAS_RESIDUAL", "ACCUMULATE", "BLOCK_MID", "BLOCK_K", "BLOCK_N"],
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

    ``bn(v) = v * scale + shift`` with the running statistics.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_mid = tl.arange(0, BLOCK_MID)
    mid_ok = offs_mid < MID
    acc = conv_tile(a_ptr, a_stride, a_ptr, a_stride, w2_ptr, w2_ptr, 0, w2_stride_tap, w2_stride_k,
                    w2_stride_n, scale2_ptr, scale2_ptr, scale2_ptr, scale2_ptr, offs_m, offs_mid, rows,
                    MID, MID, H, W, 9, 0, False, False, DOT_PRECISION, BLOCK_M, BLOCK_MID, BLOCK_K)
    safe_mid = tl.where(mid_ok, offs_mid, 0)
    act = acc * tl.load(scale2_ptr + safe_mid)[None, :] + tl.load(shift2_ptr + safe_mid)[None, :]
    act = tl.where(mid_ok[None, :], tl.maximum(act, 0.0), 0.0)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w3 = tl.load(w3_ptr + offs_mid[:, None] * w3_stride_k + offs_n[None, :] * w3_stride_n,
                 mask=mid_ok[:, None] & n_ok[None, :], other=0.0)
    out = dot(act, w3, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION)
    safe_n = tl.where(n_ok, offs_n, 0)
    out = out * tl.load(scale3_ptr + safe_n)[None, :] + tl.load(shift3_ptr + safe_n)[None, :]
    mask = (offs_m < rows)[:, None] & n_ok[None, :]
    rows64 = offs_m.to(tl.int64)[:, None]
    if HAS_RESIDUAL:
        out += tl.load(res_ptr + rows64 * res_stride + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows64 * out_stride + offs_n[None, :]
    if ACCUMULATE:
        out += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
