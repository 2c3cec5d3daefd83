"""BatchNorm reductions and the residual combine, on ``[rows, C]`` matrices.

Forward statistics arrive as per-tile partials ``(sum_t, M2_t)`` over
``n_t`` rows (``M2_t`` centred on the tile mean) and are merged tile by tile,
in order, with Chan's update (deterministic, no cancellation), ``BLOCK_T``
tiles at a time so a channel's merge is a short loop of vector loads::

    delta = sum_t / n_t - mean;  n += n_t
    mean += delta * n_t / n;     M2 += M2_t + delta^2 * n_t (n - n_t) / n
    var = M2 / rows,  invstd = 1 / sqrt(var + eps)
    scale = weight * invstd,  shift = bias - mean * scale      (bn(x) = x scale + shift)

Backward, with ``dy`` the gradient of ``bn(x)`` (ReLU-masked where one follows)::

    dbias = sum(dy),  dweight = sum(dy * xhat)
    dx = alpha dy + beta (x - mean) + delta
    alpha = weight * invstd,  beta = -alpha invstd dweight / rows,  delta = -alpha dbias / rows
    (eval: beta = delta = 0)
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tuning import optional_flags


@triton.jit
def finalize_stats_kernel(sum_ptr, m2_ptr, tiles, C, rows, tile_rows,
                          weight_ptr, bias_ptr, eps_ptr,
                          mean_ptr, var_ptr, invstd_ptr, scale_ptr, shift_ptr,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges ``BLOCK_T`` tiles at a time: their combined ``(mean_b, M2_b)``
    (``M2_b = sum M2_t + n_t (mean_t - mean_b)^2``), then Chan's update."""
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = offs < C
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < tiles
        mask = t_ok[:, None] & ok[None, :]
        n_t = tl.where(t_ok, tl.minimum(rows - offs_t * tile_rows, tile_rows), 0).to(tl.float32)
        s = tl.load(sum_ptr + offs_t[:, None] * C + offs[None, :], mask=mask, other=0.0)
        q = tl.load(m2_ptr + offs_t[:, None] * C + offs[None, :], mask=mask, other=0.0)
        count = (t0 * tile_rows).to(tl.float32)  # rows before this block: every earlier tile is full
        n_b = tl.sum(n_t, axis=0)
        mean_b = tl.sum(s, axis=0) / n_b
        d = tl.where(mask, s / tl.maximum(n_t, 1.0)[:, None] - mean_b[None, :], 0.0)
        m2_b = tl.sum(q, axis=0) + tl.sum(n_t[:, None] * d * d, axis=0)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (n_b * count / total)
    var = m2 / rows
    invstd = 1.0 / tl.sqrt(var + tl.load(eps_ptr + offs, mask=ok, other=1.0))
    scale = tl.load(weight_ptr + offs, mask=ok, other=0.0) * invstd
    shift = tl.load(bias_ptr + offs, mask=ok, other=0.0) - mean * scale
    tl.store(mean_ptr + offs, mean, mask=ok)
    tl.store(var_ptr + offs, var, mask=ok)
    tl.store(invstd_ptr + offs, invstd, mask=ok)
    tl.store(scale_ptr + offs, scale, mask=ok)
    tl.store(shift_ptr + offs, shift, mask=ok)


@triton.jit
def finalize_grad_kernel(sum_dy_ptr, sum_dy_xhat_ptr, tiles, C, rows,
                         weight_ptr, invstd_ptr, grad_weight_ptr, grad_bias_ptr,
                         alpha_ptr, beta_ptr, delta_ptr,
                         TRAINING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = offs < C
    sum_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < tiles)[:, None] & ok[None, :]
        sum_dy += tl.sum(tl.load(sum_dy_ptr + offs_t[:, None] * C + offs[None, :], mask=mask, other=0.0),
                         axis=0)
        sum_dy_xhat += tl.sum(tl.load(sum_dy_xhat_ptr + offs_t[:, None] * C + offs[None, :], mask=mask,
                                      other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + offs, mask=ok, other=0.0)
    alpha = tl.load(weight_ptr + offs, mask=ok, other=0.0) * invstd
    if TRAINING:
        beta = -alpha * invstd * sum_dy_xhat / rows
        delta = -alpha * sum_dy / rows
    else:
        beta = tl.zeros((BLOCK_C,), dtype=tl.float32)
        delta = tl.zeros((BLOCK_C,), dtype=tl.float32)
    tl.store(grad_weight_ptr + offs, sum_dy_xhat, mask=ok)
    tl.store(grad_bias_ptr + offs, sum_dy, mask=ok)
    tl.store(alpha_ptr + offs, alpha, mask=ok)
    tl.store(beta_ptr + offs, beta, mask=ok)
    tl.store(delta_ptr + offs, delta, mask=ok)


@triton.jit
def bn_grad_partials_kernel(dy_ptr, dy_stride, x_ptr, x_stride, mean_ptr, invstd_ptr,
                            ws0_ptr, ws1_ptr, rows, C,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile ``sum(dy)`` and ``sum(dy * xhat)`` of a BN without ReLU."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mask = (offs_m < rows)[:, None] & c_ok[None, :]
    rows64 = offs_m.to(tl.int64)[:, None]
    dy = tl.load(dy_ptr + rows64 * dy_stride + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows64 * x_stride + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    safe_c = tl.where(c_ok, offs_c, 0)
    xhat = (x - tl.load(mean_ptr + safe_c)[None, :]) * tl.load(invstd_ptr + safe_c)[None, :]
    tl.store(ws0_ptr + pid * C + offs_c, tl.sum(dy, axis=0), mask=c_ok)
    tl.store(ws1_ptr + pid * C + offs_c, tl.sum(tl.where(mask, dy * xhat, 0.0), axis=0), mask=c_ok)


@optional_flags(HAS_X2="x2_ptr", NORM_X2="scale2_ptr")
@triton.jit
def bn_add_kernel(out_ptr, out_stride, x1_ptr, x1_stride, scale1_ptr, shift1_ptr,
                  x2_ptr, x2_stride, scale2_ptr, shift2_ptr, rows, C,
                  ACCUMULATE: tl.constexpr, HAS_X2: tl.constexpr, NORM_X2: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out = (out if ACCUMULATE) + bn1(x1) [+ bn2(x2) | + x2]``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    safe_c = tl.where(c_ok, offs_c, 0)
    mask = (offs_m < rows)[:, None] & c_ok[None, :]
    rows64 = offs_m.to(tl.int64)[:, None]
    x1 = tl.load(x1_ptr + rows64 * x1_stride + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    v = x1 * tl.load(scale1_ptr + safe_c)[None, :] + tl.load(shift1_ptr + safe_c)[None, :]
    if HAS_X2:
        x2 = tl.load(x2_ptr + rows64 * x2_stride + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM_X2:
            x2 = x2 * tl.load(scale2_ptr + safe_c)[None, :] + tl.load(shift2_ptr + safe_c)[None, :]
        v += x2
    out_ptrs = out_ptr + rows64 * out_stride + offs_c[None, :]
    if ACCUMULATE:
        v += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)
