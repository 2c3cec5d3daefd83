"""Weight gradients of the (implicit) GEMMs, split over row chunks.

For a convolution ``out[r] = sum_t A'[r + off_t] @ B[t]`` the weight gradient is
``dB[t] = sum_r A'[r + off_t]^T D'[r]``; with ``D'`` the gradient of ``out``
after the BN-backward prologue and ``A'`` the input after its BN + ReLU
prologue, both recomputed on the fly. Each program reduces one chunk of rows
for one tap into ``ws[chunk, :, :, tap]`` (fp32, the layout of a conv weight
``[out, in, kh, kw]``); the chunks are summed in a fixed order, so the result
is deterministic.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gemm import dot, load_operand, tap_offsets
from .tuning import autotune, optional_flags


@optional_flags(A_BN_RELU="a_scale_ptr")
@autotune(("BLOCK_D", "BLOCK_A"), lambda a: a["rows_per_chunk"] // a["BLOCK_M"],
          key=["rows", "ND", "KA", "TAPS", "A_BN_RELU", "rows_per_chunk", "DOT_PRECISION", "BLOCK_D", "BLOCK_A"])
@triton.jit
def weight_grad_kernel(
        d_ptr, d_stride, dx_ptr, dx_stride, d_alpha_ptr, d_beta_ptr, d_mean_ptr, d_delta_ptr,
        a_ptr, a_stride, a_scale_ptr, a_shift_ptr,
        ws_ptr, rows, ND, KA, H, W, rows_per_chunk,
        TAPS: tl.constexpr, A_BN_RELU: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr):
    """``ws[chunk, d, a, tap] = sum_{r in chunk} D'[r, d] A'[r + off_tap, a]`` (conv weight layout).

    ``D' = alpha D + beta (X_d - mean) + delta`` (``X_d`` at ``dx_ptr``) and
    ``A' = relu(A * a_scale + a_shift)`` (A_BN_RELU) or ``A``; see :mod:`gemm`.
    """
    chunk = tl.program_id(0)
    tap = tl.program_id(1)
    tiles_a = tl.cdiv(KA, BLOCK_A)
    pid_d = tl.program_id(2) // tiles_a
    pid_a = tl.program_id(2) % tiles_a
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    dh, dw = tap_offsets(tap, TAPS)
    start = chunk * rows_per_chunk
    stop = tl.minimum(start + rows_per_chunk, rows)
    acc = tl.zeros((BLOCK_D, BLOCK_A), dtype=tl.float32)
    for r0 in range(start, stop, BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < stop
        d = load_operand(d_ptr, d_stride, offs_m, offs_d, m_ok, ND, H, W, 0, 0,
                         x_ptr=dx_ptr, x_stride=dx_stride, alpha_ptr=d_alpha_ptr, beta_ptr=d_beta_ptr,
                         mean_ptr=d_mean_ptr, delta_ptr=d_delta_ptr)  # [BLOCK_M, BLOCK_D]
        a = load_operand(a_ptr, a_stride, offs_m, offs_a, m_ok, KA, H, W, dh, dw,
                         scale_ptr=a_scale_ptr, shift_ptr=a_shift_ptr)  # [BLOCK_M, BLOCK_A]
        a = a.to(a_ptr.dtype.element_ty)
        acc = dot(tl.trans(d), a, acc, DOT_PRECISION)
    out = ws_ptr + (((chunk * ND + offs_d[:, None]).to(tl.int64) * KA + offs_a[None, :]) * TAPS + tap)
    tl.store(out, acc, mask=(offs_d[:, None] < ND) & (offs_a[None, :] < KA))
