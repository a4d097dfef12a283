"""Standalone trace loss TL(y) = sum_j (v_j - 1)^2, v_j the unbiased variance of variable j (docs/math.md §4).

(intl_loss does not use these: it takes v from the iternorm forward's epilogue.)
Design: y's (B, N, C) observation view through strides. `_colvar_kernel`, grid (C/BC, B): one pass
over N per column block, shifted by the first observation (robust to a large mean), writing
v_j and mean_j. `_trace_loss_bwd_kernel`, grid (N/BN, C/BC, B): dy_ij = 4 g (v_j - 1)(y_ij - mean_j)/(N-1)
in y's dtype, written straight into the (m, d) layout. Reads y twice in all, writes it once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Work, aligned, block, nc_tile, num_warps, strides


@triton.jit
def _colvar_kernel(
    y_ptr,  # (B, N, C), strides (s_yb, s_yn, s_yc)
    v_ptr, mean_ptr,  # (B, C) fp32, written
    N, C, s_yb, s_yn, s_yc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i_c, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    p_y = y_ptr + i_b * s_yb
    b_s = tl.load(p_y + o_c * s_yc, mask=m_c, other=0.0).to(tl.float32)
    b_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    b_sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_nc = (o_n < N)[:, None] & m_c[None, :]
        b_y = tl.load(p_y + o_n[:, None] * s_yn + o_c[None, :] * s_yc, mask=m_nc, other=0.0).to(tl.float32)
        b_y = tl.where(m_nc, b_y - b_s[None, :], 0.0)
        b_sum += tl.sum(b_y, axis=0)
        b_sq += tl.sum(b_y * b_y, axis=0)
    tl.store(v_ptr + i_b * C + o_c, (b_sq - b_sum * b_sum / N) / (N - 1), mask=m_c)
    tl.store(mean_ptr + i_b * C + o_c, b_s + b_sum / N, mask=m_c)


@triton.jit
def _trace_loss_bwd_kernel(
    g_ptr,  # (B,) fp32 upstream gradient
    y_ptr,  # (B, N, C) strided
    v_ptr, mean_ptr,  # (B, C) fp32
    gy_ptr,  # (B, N, C) y's dtype, strides (s_gb, s_gn, s_gc), written
    N, C, s_yb, s_yn, s_yc, s_gb, s_gn, s_gc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i_b, o_n, o_c, m_n, m_c = nc_tile(N, C, BLOCK_N, BLOCK_C)
    m_nc = m_n[:, None] & m_c[None, :]
    b_v = tl.load(v_ptr + i_b * C + o_c, mask=m_c, other=0.0)
    b_mu = tl.load(mean_ptr + i_b * C + o_c, mask=m_c, other=0.0)
    b_coef = tl.load(g_ptr + i_b) * 4.0 * (b_v - 1.0) / (N - 1)
    b_y = tl.load(y_ptr + i_b * s_yb + o_n[:, None] * s_yn + o_c[None, :] * s_yc, mask=m_nc, other=0.0)
    b_g = (b_y.to(tl.float32) - b_mu[None, :]) * b_coef[None, :]
    tl.store(gy_ptr + i_b * s_gb + o_n[:, None] * s_gn + o_c[None, :] * s_gc,
             b_g.to(gy_ptr.dtype.element_ty), mask=m_nc)


def column_variances(y_obs: torch.Tensor):
    """(v, mean), each (B, C) fp32, of the (B, N, C) observation view y_obs."""
    B, N, C = y_obs.shape
    bc = block(C, gpu=64, interp=256)
    v = torch.empty(B, C, device=y_obs.device, dtype=torch.float32)
    mean = torch.empty_like(v)
    _colvar_kernel[(triton.cdiv(C, bc), B)](y_obs, v, mean, N, C, *y_obs.stride(),
                                            BLOCK_N=block(N, gpu=64, interp=256), BLOCK_C=bc,
                                            num_warps=num_warps(bc * bc, is_aligned=aligned(N, C, *strides(y_obs))))
    return v, mean


def trace_loss_fwd(y_obs: torch.Tensor) -> torch.Tensor:
    v, _ = column_variances(y_obs)
    return ((v - 1.0) ** 2).sum(-1)


def trace_loss_bwd(grad: torch.Tensor, y_obs: torch.Tensor, gy_obs: torch.Tensor) -> None:
    """Write d(grad . TL)/dy into gy_obs (the observation view of the output gradient)."""
    B, N, C = y_obs.shape
    v, mean = column_variances(y_obs)
    g = grad.to(torch.float32).reshape(B).contiguous()
    bn, bc = block(N, gpu=64, interp=256), block(C, gpu=64, interp=256)
    _trace_loss_bwd_kernel[(triton.cdiv(N, bn), triton.cdiv(C, bc), B)](
        g, y_obs, v, mean, gy_obs, N, C, *y_obs.stride(), *gy_obs.stride(), BLOCK_N=bn, BLOCK_C=bc)


# ------------------------------------------------------------------ performance model (bench/model.py)
# What each launch does, from its bound arguments (by parameter name) and grid. Bytes are HBM traffic:
# y is read once in all (each program reads its own column block or tile of it); the (B, C) statistics
# are small and counted once.
def _colvar_work(args: dict, grid: tuple[int, int, int]) -> Work:
    y = args["y_ptr"]  # (B, N, C) observation view
    return Work(flops=4.0 * y.numel(),  # shift, add, square, add per element
                bytes=y.numel() * y.element_size() + 2 * args["v_ptr"].numel() * 4)


def _trace_loss_bwd_work(args: dict, grid: tuple[int, int, int]) -> Work:
    y, gy = args["y_ptr"], args["gy_ptr"]
    return Work(flops=2.0 * y.numel(),  # subtract the mean, scale
                bytes=y.numel() * y.element_size() + gy.numel() * gy.element_size() + 2 * args["v_ptr"].numel() * 4)


COSTS = {"_colvar_kernel": _colvar_work, "_trace_loss_bwd_kernel": _trace_loss_bwd_work}
