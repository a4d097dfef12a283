"""Apply the whitening matrix, forward and backward (docs/math.md §3 and §5).

Design (A the (B, N, C) observation view of x, read through strides; y, grad_y likewise)
- `_apply_fwd_kernel`, grid (N/BN, C/BC, B): Y = (A - mu) W * rs with W = P_T, rs = 1/sqrt(tr)
  (0 for constant input). Centering in the prologue, scaling in the epilogue, the tile stored in
  the input dtype straight into the (m, d) layout of y (for axis=0 that is Y^T: only strides
  differ). The epilogue also writes per-tile column sums and sums of squares of the fp32 Y, from
  which the output variances v (the trace loss's input) follow without another pass over y.
  2 N C^2 FLOPs, A read C/BC times (from L2), y written once.
- Backward. The trace-loss gradient grad_v enters through Ybar' = Ybar + 2 gv_j y_ij / (N-1)
  (y's column means are 0 in exact arithmetic and any constant per column cancels exactly below:
  Ac^T 1 = 0 and the final column-mean subtraction), fused in each prologue.
  `_apply_bwd_w_kernel`, grid (C/BC, C/BC, B): G = rs * Ac^T Ybar' (= Pbar = Wbar / sqrt(tr)) and, in
  the programs of the first tile row, the column sums of Ybar'. 2 N C^2 FLOPs.
  `_apply_bwd_x_kernel`, grid (N/BN, C/BC, B): Abar = (Ybar' - colmean(Ybar')) W + Ac M with
  M = (Sigmabar + Sigmabar^T) / (N-1): two K loops into one accumulator. Subtracting the column
  mean of Ybar' in the prologue is the "minus column means" of docs/math.md §5 (Ac M has zero column means).
  Stored in x's dtype straight into x's layout. 4 N C^2 FLOPs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import aligned, block, dot_acc, dot_precision, guarded_rsqrt, half_dot, nc_tile, num_warps, strides


@triton.jit
def _apply_fwd_kernel(
    a_ptr,  # A (B, N, C) input dtype, strides (s_ab, s_an, s_ac)
    mean_ptr,  # mu (B, C) fp32 contiguous
    w_ptr,  # P_T (B, C, C) fp32, batch stride s_wb (0: one shared identity), row-major
    tr_ptr,  # tr (B,) fp32
    y_ptr,  # Y (B, N, C) output dtype, strides (s_yb, s_yn, s_yc): the obs view of the (m, d) y
    part_ptr,  # (B, 2, N/BN, C) fp32: per-tile column sums and sums of squares of Y
    N, C, s_ab, s_an, s_ac, s_wb, s_yb, s_yn, s_yc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HALF_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    i_b, o_n, o_c, m_n, m_c = nc_tile(N, C, BLOCK_N, BLOCK_C)
    p_a = a_ptr + i_b * s_ab
    p_w = w_ptr + i_b * s_wb
    b_acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        m_nk = m_n[:, None] & m_k[None, :]
        b_mu = tl.load(mean_ptr + i_b * C + o_k, mask=m_k, other=0.0)
        b_a = tl.load(p_a + o_n[:, None] * s_an + o_k[None, :] * s_ac, mask=m_nk, other=0.0).to(tl.float32)
        b_a = tl.where(m_nk, b_a - b_mu[None, :], 0.0)
        b_w = tl.load(p_w + o_k[:, None] * C + o_c[None, :], mask=m_k[:, None] & m_c[None, :], other=0.0)
        b_acc = dot_acc(b_a, b_w, b_acc, a_ptr.dtype.element_ty, HALF_DOT, PREC)
    b_y = b_acc * guarded_rsqrt(tl.load(tr_ptr + i_b))
    m_nc = m_n[:, None] & m_c[None, :]
    tl.store(y_ptr + i_b * s_yb + o_n[:, None] * s_yn + o_c[None, :] * s_yc,
             b_y.to(y_ptr.dtype.element_ty), mask=m_nc)
    # rows past N are 0 (masked A), so they add nothing to the sums
    n_tiles = tl.num_programs(0)
    p_part = part_ptr + (i_b * 2 * n_tiles + tl.program_id(0)) * C + o_c
    tl.store(p_part, tl.sum(b_y, axis=0), mask=m_c)
    tl.store(p_part + n_tiles * C, tl.sum(b_y * b_y, axis=0), mask=m_c)


@triton.jit
def _ybar_tile(gy_ptr, y_ptr, gv_ptr, i_b, o_n, o_c, m_nc, c_v,
               s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, C):
    """Ybar' = grad_y + c_v * gv_j * y_ij on one (BN, BC) tile, fp32, 0 outside the mask."""
    b_gy = tl.load(gy_ptr + i_b * s_gb + o_n[:, None] * s_gn + o_c[None, :] * s_gc, mask=m_nc, other=0.0)
    b_y = tl.load(y_ptr + i_b * s_yb + o_n[:, None] * s_yn + o_c[None, :] * s_yc, mask=m_nc, other=0.0)
    b_gv = tl.load(gv_ptr + i_b * C + o_c, mask=o_c < C, other=0.0)
    return b_gy.to(tl.float32) + (c_v * b_gv)[None, :] * b_y.to(tl.float32)


@triton.jit
def _apply_bwd_w_kernel(
    a_ptr,  # A (B, N, C), strides (s_ab, s_an, s_ac)
    mean_ptr,  # mu (B, C) fp32
    gy_ptr,  # grad_y obs view (B, N, C), strides (s_gb, s_gn, s_gc)
    y_ptr,  # y obs view (B, N, C), strides (s_yb, s_yn, s_yc)
    gv_ptr,  # grad_v (B, C) fp32 contiguous
    tr_ptr,  # tr (B,)
    g_ptr,  # G = rs * Ac^T Ybar' (B, C, C) fp32 contiguous, written
    ysum_ptr,  # column sums of Ybar' (B, C) fp32, written by the programs with i_i == 0
    N, C, c_v, s_ab, s_an, s_ac, s_gb, s_gn, s_gc, s_yb, s_yn, s_yc,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, HALF_DOT: tl.constexpr, PREC: tl.constexpr,
):
    i_i, i_j, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_i = i_i * BLOCK_C + tl.arange(0, BLOCK_C)
    o_j = i_j * BLOCK_C + tl.arange(0, BLOCK_C)
    m_i, m_j = o_i < C, o_j < C
    b_mu = tl.load(mean_ptr + i_b * C + o_i, mask=m_i, other=0.0)
    b_acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    b_ysum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < N
        m_ni = m_n[:, None] & m_i[None, :]
        m_nj = m_n[:, None] & m_j[None, :]
        b_a = tl.load(a_ptr + i_b * s_ab + o_n[:, None] * s_an + o_i[None, :] * s_ac, mask=m_ni, other=0.0)
        b_a = tl.where(m_ni, b_a.to(tl.float32) - b_mu[None, :], 0.0)
        b_yb = _ybar_tile(gy_ptr, y_ptr, gv_ptr, i_b, o_n, o_j, m_nj, c_v,
                          s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, C)
        b_acc = dot_acc(tl.trans(b_a), b_yb, b_acc, a_ptr.dtype.element_ty, HALF_DOT, PREC)
        b_ysum += tl.sum(b_yb, axis=0)
    b_g = b_acc * guarded_rsqrt(tl.load(tr_ptr + i_b))
    tl.store(g_ptr + i_b * C * C + o_i[:, None] * C + o_j[None, :], b_g, mask=m_i[:, None] & m_j[None, :])
    if i_i == 0:
        tl.store(ysum_ptr + i_b * C + o_j, b_ysum, mask=m_j)


@triton.jit
def _apply_bwd_x_kernel(
    a_ptr, mean_ptr, gy_ptr, y_ptr, gv_ptr, tr_ptr,  # as in _apply_bwd_w_kernel
    ysum_ptr,  # column sums of Ybar' (B, C)
    w_ptr,  # P_T (B, C, C) fp32, batch stride s_wb, row-major (symmetric: W^T = W)
    msym_ptr,  # M = (Sigmabar + Sigmabar^T) / (N - 1) (B, C, C) fp32 contiguous
    gx_ptr,  # Abar (B, N, C) in x's dtype, strides (s_xb, s_xn, s_xc): the obs view of grad_x
    N, C, c_v, s_ab, s_an, s_ac, s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, s_wb, s_xb, s_xn, s_xc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HALF_DOT: tl.constexpr,
    PREC: tl.constexpr,
):
    i_b, o_n, o_c, m_n, m_c = nc_tile(N, C, BLOCK_N, BLOCK_C)
    rs = guarded_rsqrt(tl.load(tr_ptr + i_b))
    b_acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    # (Ybar' - colmean(Ybar')) @ W
    for k0 in range(0, C, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        m_nk = m_n[:, None] & m_k[None, :]
        b_yb = _ybar_tile(gy_ptr, y_ptr, gv_ptr, i_b, o_n, o_k, m_nk, c_v,
                          s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, C)
        b_ym = tl.load(ysum_ptr + i_b * C + o_k, mask=m_k, other=0.0) / N
        b_yb = tl.where(m_nk, b_yb - b_ym[None, :], 0.0)
        b_w = tl.load(w_ptr + i_b * s_wb + o_k[:, None] * C + o_c[None, :], mask=m_k[:, None] & m_c[None, :], other=0.0)
        b_acc = dot_acc(b_yb, b_w * rs, b_acc, a_ptr.dtype.element_ty, HALF_DOT, PREC)
    # + Ac @ M, always in fp32 operands: M = Sigmabar / (N-1) can be far below fp16's normal range
    for k0 in range(0, C, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        m_nk = m_n[:, None] & m_k[None, :]
        b_mu = tl.load(mean_ptr + i_b * C + o_k, mask=m_k, other=0.0)
        b_a = tl.load(a_ptr + i_b * s_ab + o_n[:, None] * s_an + o_k[None, :] * s_ac, mask=m_nk, other=0.0)
        b_a = tl.where(m_nk, b_a.to(tl.float32) - b_mu[None, :], 0.0)
        b_m = tl.load(msym_ptr + i_b * C * C + o_k[:, None] * C + o_c[None, :], mask=m_k[:, None] & m_c[None, :], other=0.0)
        b_acc = tl.dot(b_a, b_m, b_acc, input_precision=PREC)
    tl.store(gx_ptr + i_b * s_xb + o_n[:, None] * s_xn + o_c[None, :] * s_xc,
             b_acc.to(gx_ptr.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])


def _blocks(N: int, C: int, prec: str):
    """(BLOCK_N, BLOCK_C, BLOCK_K); exact fp32 FMA products take smaller tiles (larger ones spilled)."""
    ieee = prec == "ieee"
    return block(N, gpu=32 if ieee else 64), block(C, gpu=64), block(C, gpu=16 if ieee else 32)


def apply_fwd(a, mean, w, tr, y_obs):
    """Write Y = (A - mean) w / sqrt(tr) into y_obs (the (B, N, C) view of y); return v (B, C) fp32,
    the unbiased column variances of the fp32 Y. w: (B, C, C) row-major, batch stride may be 0."""
    B, N, C = a.shape
    prec = dot_precision()
    bn, bc, bk = _blocks(N, C, prec)
    al = aligned(N, C, *strides(a, y_obs))
    nn = triton.cdiv(N, bn)
    part = torch.empty(B, 2, nn, C, device=a.device, dtype=torch.float32)
    _apply_fwd_kernel[(nn, triton.cdiv(C, bc), B)](
        a, mean, w, tr, y_obs, part, N, C, *a.stride(), w.stride(0), *y_obs.stride(),
        BLOCK_N=bn, BLOCK_C=bc, BLOCK_K=bk, HALF_DOT=half_dot(a.dtype, prec), PREC=prec,
        num_warps=num_warps(bn * bc, prec, al))
    s1, s2 = part.sum(2).unbind(1)
    return (s2 - s1 * s1 / N) / (N - 1)


def apply_bwd(a, mean, w, tr, gy_obs, y_obs, gv, ns_bwd, gx_obs):
    """Write dL/dA into gx_obs. ns_bwd(G) -> M = (Sigmabar + Sigmabar^T)/(N-1) (B, C, C) contiguous,
    given G = dL/dP_T (B, C, C) (the Newton-Schulz backward and the trace/covariance chain rule)."""
    B, N, C = a.shape
    prec = dot_precision()
    bn, bc, bk = _blocks(N, C, prec)
    bcc = block(C, gpu=64)
    al = aligned(N, C, *strides(a, gy_obs, y_obs, gx_obs))
    G = torch.empty(B, C, C, device=a.device, dtype=torch.float32)
    ysum = torch.empty(B, C, device=a.device, dtype=torch.float32)
    c_v = 2.0 / (N - 1)
    gv = gv.to(torch.float32).contiguous()
    ntc = triton.cdiv(C, bcc)
    _apply_bwd_w_kernel[(ntc, ntc, B)](
        a, mean, gy_obs, y_obs, gv, tr, G, ysum, N, C, c_v, *a.stride(), *gy_obs.stride(), *y_obs.stride(),
        BLOCK_C=bcc, BLOCK_N=block(N, gpu=32), HALF_DOT=half_dot(a.dtype, prec), PREC=prec,
        num_warps=num_warps(bcc * bcc, prec, al))
    M = ns_bwd(G)
    _apply_bwd_x_kernel[(triton.cdiv(N, bn), triton.cdiv(C, bc), B)](
        a, mean, gy_obs, y_obs, gv, tr, ysum, w, M, gx_obs, N, C, c_v, *a.stride(), *gy_obs.stride(),
        *y_obs.stride(), w.stride(0), *gx_obs.stride(),
        BLOCK_N=bn, BLOCK_C=bc, BLOCK_K=bk, HALF_DOT=half_dot(a.dtype, prec), PREC=prec,
        num_warps=num_warps(bn * bc, prec, al))
