"""Apply the whitening matrix, forward and backward (docs/math.md §3 and §5).

Design (A the (B, N, C) observation view of x, read through strides; y, grad_y likewise)
- Forward, 2 launches.
  `_apply_fwd_kernel`, grid (N/BN, C/BC, B): Y = (A - mu) W * rs with W = P_T, rs = 1/sqrt(tr)
  (0 for constant input). Centering in the prologue, scaling in the epilogue, the tile stored in
  the input dtype straight into the (m, d) layout of y (for axis=0 that is Y^T: only strides
  differ). The epilogue also writes per-tile column sums and sums of squares of the fp32 Y.
  `_apply_fwd_var_kernel`, grid (C/32, B), one warp each: the output variances v (the trace loss's
  input) from those, summed in tile order (deterministic): no other pass over y, no torch reduction.
- Backward, 3 launches besides the Newton-Schulz backward (2 when the rows are not split).
  The trace-loss gradient grad_v enters through Ybar' = Ybar + 2 gv_j y_ij / (N-1) (y's column means
  are 0 in exact arithmetic and any constant per column cancels exactly below: Ac^T 1 = 0 and the
  final column-mean subtraction), fused in each prologue.
  `_apply_bwd_w_partial_kernel`, grid (C/BC, C/BC, B * n_split): program (i, j, b, k) sums rows chunk
  k of tile (i, j) of Ac^T Ybar' into fp32 partials (B, n_split, C, C), and the programs of tile row
  0 the chunk's column sums of Ybar'. The split (covariance.split_rows over all tiles: chunks of at
  most MAX_SPLIT_ROWS, as many as fill one wave of the GPU) turns the headline's 32 programs (C = 256,
  2 views) into 256 (of the H200's 264 slots at 2 per SM) and bounds each sequential fp32 sum.
  `_apply_bwd_w_reduce_kernel`, grid (C/32, C/32, B) (a stream: small tiles, many programs): sums
  the chunks in order (deterministic), writes G = rs * sum (= dL/dP_T), the column sums ysum of
  Ybar', and per-tile partial Frobenius products gp[b, tile] = <G, P_T> over the tile (the trace's
  gradient needs <G, P_T> before the Newton-Schulz backward overwrites G). With one chunk (n_split = 1) the partial kernel does this
  itself (FINISH): no partials, no reduce launch.
  The Newton-Schulz backward (a callback) turns G into Sbar = dL/dS and ss, partial sums of <Sbar, S>.
  `_apply_bwd_x_kernel`, grid (N/BN, C/BC, B): Abar = (Ybar' - colmean(Ybar')) W rs + Ac M with
  M = (Sigmabar + Sigmabar^T) / (N-1), Sigmabar = Sbar / tr + (trbar - <Sbar, S> / tr) I,
  trbar = -0.5 <G, P_T> / tr (reference.covariance_grad). The prologue sums the gp and ss partials
  (fixed order); each M tile is formed on the fly from an Sbar tile, the transposed Sbar tile and the
  diagonal term, so no C x C torch op runs between the kernels. Two K loops into one accumulator.
  Subtracting the column mean of Ybar' is the "minus column means" of docs/math.md §5 (Ac M has zero
  column means). Stored in x's dtype straight into x's layout.
- Autotuned on the GPU (`_common.autotune` with _common.gpu_configs: num_warps, num_stages,
  BLOCK_K; one config under the interpreter): `_apply_fwd_kernel`, `_apply_bwd_w_partial_kernel`,
  `_apply_bwd_x_kernel`. The block sizes that size the grid stay the launchers' (`_common.block`).
  Autotuning runs a kernel several times: each of them only writes buffers it never reads (idempotent).
FLOPs (multiply-add = 2): forward 2 N C^2; backward 2 N C^2 (G) + 4 N C^2 (dA) + O(n_split C^2).
Bytes: forward A read (once per column tile when a view exceeds the L2 rule of covariance.py),
y written, 8 N C / BN of column partials; backward A, grad_y, y read twice (G, then dA), dA written,
n_split C^2 fp32 partials written and read, G written, Sbar read twice (tile and transposed tile).
COSTS maps each kernel's name to its Work, by covariance.py's rule for re-read operands.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from ._common import (Work, aligned, autotune, block, cc_tile, dot_acc, dot_precision, gpu_configs,
                      guarded_inverse, guarded_rsqrt, half_dot, nc_tile, num_warps, prune_spills, reread_bytes,
                      strides, tuned_kwargs)
from .covariance import split_rows

_FWD_SIZES = ("N", "C", "s_ab", "s_an", "s_ac", "s_yb", "s_yn", "s_yc")
_BWD_SIZES = ("N", "C", "s_ab", "s_an", "s_ac", "s_gb", "s_gn", "s_gc", "s_yb", "s_yn", "s_yc")
# The dA kernel's prologue sums its few partials in vectors of this many (one constant: no extra
# compiled variants per shape).
_BLOCK_R = 128


# Idempotent (autotune runs it several times): writes y and part, never reads them.
@autotune(gpu_configs((32, 64)),
          key=["N", "C", "s_an", "s_ac", "s_yn", "s_yc", "BLOCK_N", "BLOCK_C", "HALF_DOT", "PREC"],
          prune=prune_spills(lambda kw: kw["BLOCK_N"] * kw["BLOCK_C"], _FWD_SIZES))
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
def _apply_fwd_var_kernel(
    part_ptr,  # (B, 2, n_tiles, C) fp32 from _apply_fwd_kernel
    v_ptr,  # v (B, C) fp32, written
    N, C, n_tiles,
    BLOCK_C: tl.constexpr,
):
    i_c, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    p_part = part_ptr + i_b * 2 * n_tiles * C + o_c
    b_s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    b_s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(0, n_tiles):  # tile order: deterministic
        b_s1 += tl.load(p_part + t * C, mask=m_c, other=0.0)
        b_s2 += tl.load(p_part + (n_tiles + t) * C, mask=m_c, other=0.0)
    # No shift needed (unlike the covariance): Y = Ac W has zero column means in exact arithmetic, so
    # s1 is rounding noise, s1^2 / N is negligible against s2 and the difference cannot cancel.
    tl.store(v_ptr + i_b * C + o_c, (b_s2 - b_s1 * b_s1 / N) / (N - 1), mask=m_c)


@triton.jit
def _ybar_tile(gy_ptr, y_ptr, gv_ptr, i_b, o_n, o_c, m_nc, c_v,
               s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, s_vb, s_vc, C):
    """Ybar' = grad_y + c_v * gv_j * y_ij on one (BN, BC) tile, fp32, 0 outside the mask."""
    b_gy = tl.load(gy_ptr + i_b * s_gb + o_n[:, None] * s_gn + o_c[None, :] * s_gc, mask=m_nc, other=0.0)
    b_y = tl.load(y_ptr + i_b * s_yb + o_n[:, None] * s_yn + o_c[None, :] * s_yc, mask=m_nc, other=0.0)
    b_gv = tl.load(gv_ptr + i_b * s_vb + o_c * s_vc, mask=o_c < C, other=0.0).to(tl.float32)
    return b_gy.to(tl.float32) + (c_v * b_gv)[None, :] * b_y.to(tl.float32)


@triton.jit
def _w_finish(b_acc, b_ysum, i_i, i_j, i_b, o_i, o_j, m_i, m_j, C, s_wb,
              w_ptr, tr_ptr, g_ptr, ysum_ptr, gp_ptr):
    """Epilogue of a tile of Ac^T Ybar': G = rs * tile, ysum (tile row 0), and gp[b, tile] = <G, P_T>
    over the tile."""
    b_g = b_acc * guarded_rsqrt(tl.load(tr_ptr + i_b))
    m_ij = m_i[:, None] & m_j[None, :]
    tl.store(g_ptr + i_b * C * C + o_i[:, None] * C + o_j[None, :], b_g, mask=m_ij)
    if i_i == 0:
        tl.store(ysum_ptr + i_b * C + o_j, b_ysum, mask=m_j)
    b_w = tl.load(w_ptr + i_b * s_wb + o_i[:, None] * C + o_j[None, :], mask=m_ij, other=0.0)
    nt = tl.num_programs(0)
    tl.store(gp_ptr + (i_b * nt + i_i) * nt + i_j, tl.sum(tl.sum(b_g * b_w, axis=1), axis=0))


# Idempotent (autotune runs it several times): writes part, psum (G, ysum, gp with FINISH), never reads them.
@autotune(gpu_configs(),
          key=["N", "C", "n_split", "s_an", "s_ac", "s_gn", "s_gc", "s_yn", "s_yc", "BLOCK_C", "BLOCK_N", "HALF_DOT",
               "PREC", "FINISH"],
          prune=prune_spills(lambda kw: kw["BLOCK_C"] ** 2, _BWD_SIZES))
@triton.jit
def _apply_bwd_w_partial_kernel(
    a_ptr,  # A (B, N, C), strides (s_ab, s_an, s_ac)
    mean_ptr,  # mu (B, C) fp32
    gy_ptr,  # grad_y obs view (B, N, C), strides (s_gb, s_gn, s_gc)
    y_ptr,  # y obs view (B, N, C), strides (s_yb, s_yn, s_yc)
    gv_ptr,  # grad_v (B, C) fp32, strides (s_vb, s_vc)
    part_ptr,  # partials of Ac^T Ybar' (B, n_split, C, C) fp32 contiguous; FINISH: G (B, C, C)
    psum_ptr,  # partial column sums of Ybar' (B, n_split, C) fp32, tile row 0; FINISH: ysum (B, C)
    w_ptr, tr_ptr, gp_ptr,  # FINISH only: P_T (batch stride s_wb, row-major), tr (B,), gp (B, nt * nt)
    N, C, n_split, rows_per_split, c_v, s_ab, s_an, s_ac, s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, s_vb, s_vc, s_wb,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, HALF_DOT: tl.constexpr, PREC: tl.constexpr,
    FINISH: tl.constexpr,
):
    i_i, i_j, i_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_k = (i_z // n_split).to(tl.int64), i_z % n_split
    o_i, o_j, m_i, m_j = cc_tile(i_i, i_j, C, BLOCK_C)
    b_mu = tl.load(mean_ptr + i_b * C + o_i, mask=m_i, other=0.0)
    b_acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    b_ysum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    n_lo = i_k * rows_per_split
    n_hi = tl.minimum(N, n_lo + rows_per_split)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < n_hi
        m_ni = m_n[:, None] & m_i[None, :]
        m_nj = m_n[:, None] & m_j[None, :]
        b_a = tl.load(a_ptr + i_b * s_ab + o_n[:, None] * s_an + o_i[None, :] * s_ac, mask=m_ni, other=0.0)
        b_a = tl.where(m_ni, b_a.to(tl.float32) - b_mu[None, :], 0.0)
        b_yb = _ybar_tile(gy_ptr, y_ptr, gv_ptr, i_b, o_n, o_j, m_nj, c_v,
                          s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, s_vb, s_vc, C)
        b_acc = dot_acc(tl.trans(b_a), b_yb, b_acc, a_ptr.dtype.element_ty, HALF_DOT, PREC)
        b_ysum += tl.sum(b_yb, axis=0)
    if FINISH:
        _w_finish(b_acc, b_ysum, i_i, i_j, i_b, o_i, o_j, m_i, m_j, C, s_wb, w_ptr, tr_ptr, part_ptr, psum_ptr,
                  gp_ptr)
    else:
        p_part = part_ptr + (i_b * n_split + i_k) * C * C
        tl.store(p_part + o_i[:, None] * C + o_j[None, :], b_acc, mask=m_i[:, None] & m_j[None, :])
        if i_i == 0:
            tl.store(psum_ptr + (i_b * n_split + i_k) * C + o_j, b_ysum, mask=m_j)


@triton.jit
def _apply_bwd_w_reduce_kernel(
    part_ptr, psum_ptr,  # as written by _apply_bwd_w_partial_kernel (not FINISH)
    w_ptr,  # P_T (B, C, C) fp32, batch stride s_wb, row-major
    tr_ptr,  # tr (B,)
    g_ptr,  # G = rs * Ac^T Ybar' (B, C, C) fp32 contiguous, written
    ysum_ptr,  # column sums of Ybar' (B, C) fp32, written by the programs of tile row 0
    gp_ptr,  # (B, nt * nt) fp32: <G, P_T> over each tile, written
    C, n_split, s_wb,
    BLOCK_C: tl.constexpr,
):
    i_i, i_j, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_i, o_j, m_i, m_j = cc_tile(i_i, i_j, C, BLOCK_C)
    m_ij = m_i[:, None] & m_j[None, :]
    b_acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    b_ysum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for k in range(0, n_split):  # fixed order: deterministic
        b_acc += tl.load(part_ptr + (i_b * n_split + k) * C * C + o_i[:, None] * C + o_j[None, :], mask=m_ij, other=0.0)
    if i_i == 0:
        for k in range(0, n_split):
            b_ysum += tl.load(psum_ptr + (i_b * n_split + k) * C + o_j, mask=m_j, other=0.0)
    _w_finish(b_acc, b_ysum, i_i, i_j, i_b, o_i, o_j, m_i, m_j, C, s_wb, w_ptr, tr_ptr, g_ptr, ysum_ptr, gp_ptr)


@triton.jit
def _sum_vec(p, n, stride, BLOCK_R: tl.constexpr):
    """sum_r p[r * stride], r < n, fp32, in a fixed order."""
    b_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        b_acc += tl.load(p + o_r * stride, mask=o_r < n, other=0.0)
    return tl.sum(b_acc, axis=0)


# Idempotent (autotune runs it several times): writes gx only, which no input aliases.
@autotune(gpu_configs((32, 64)),
          key=["N", "C", "n_gp", "n_ss", "s_an", "s_ac", "s_gn", "s_gc", "s_yn", "s_yc", "s_xn", "s_xc", "BLOCK_N",
               "BLOCK_C", "HALF_DOT", "PREC"],
          prune=prune_spills(lambda kw: kw["BLOCK_N"] * kw["BLOCK_C"], _BWD_SIZES + ("s_xb", "s_xn", "s_xc"),
                             wide_k_warps=8, wide_k_unaligned=False))  # BLOCK_K 64 spilled in both cases
@triton.jit
def _apply_bwd_x_kernel(
    a_ptr, mean_ptr, gy_ptr, y_ptr, gv_ptr, tr_ptr,  # as in _apply_bwd_w_partial_kernel
    ysum_ptr,  # column sums of Ybar' (B, C)
    w_ptr,  # P_T (B, C, C) fp32, batch stride s_wb, row-major (symmetric: W^T = W)
    sbar_ptr,  # Sbar = dL/dS (B, C, C) fp32 contiguous
    gp_ptr,  # (B, n_gp) fp32: partials of <G, P_T>, contiguous
    ss_ptr,  # (B, n_ss) fp32: partials of <Sbar, S>, strides (s_ssb, s_ssn)
    gx_ptr,  # Abar (B, N, C) in x's dtype, strides (s_xb, s_xn, s_xc): the obs view of grad_x
    N, C, n_gp, n_ss, c_v, s_ab, s_an, s_ac, s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, s_vb, s_vc, s_wb,
    s_ssb, s_ssn, s_xb, s_xn, s_xc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HALF_DOT: tl.constexpr, PREC: tl.constexpr,
):
    i_b, o_n, o_c, m_n, m_c = nc_tile(N, C, BLOCK_N, BLOCK_C)
    tr = tl.load(tr_ptr + i_b)
    rs = guarded_rsqrt(tr)
    inv_tr = guarded_inverse(tr)
    # the C x C chain rule's scalars (reference.covariance_grad / sigma_grad), from a few partials
    gp = _sum_vec(gp_ptr + i_b * n_gp, n_gp, 1, BLOCK_R)  # <G, P_T>
    ss = _sum_vec(ss_ptr + i_b * s_ssb, n_ss, s_ssn, BLOCK_R)  # <Sbar, S>
    trbar = -0.5 * inv_tr * gp
    c_m = inv_tr / (N - 1)  # M = c_m (Sbar + Sbar^T) + c_d I
    c_d = 2.0 * (trbar - ss * inv_tr) / (N - 1)
    b_acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    # (Ybar' - colmean(Ybar')) @ W
    for k0 in range(0, C, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        m_nk = m_n[:, None] & m_k[None, :]
        b_yb = _ybar_tile(gy_ptr, y_ptr, gv_ptr, i_b, o_n, o_k, m_nk, c_v,
                          s_gb, s_gn, s_gc, s_yb, s_yn, s_yc, s_vb, s_vc, C)
        b_ym = tl.load(ysum_ptr + i_b * C + o_k, mask=m_k, other=0.0) / N
        b_yb = tl.where(m_nk, b_yb - b_ym[None, :], 0.0)
        b_w = tl.load(w_ptr + i_b * s_wb + o_k[:, None] * C + o_c[None, :], mask=m_k[:, None] & m_c[None, :], other=0.0)
        b_acc = dot_acc(b_yb, b_w * rs, b_acc, a_ptr.dtype.element_ty, HALF_DOT, PREC)
    # + Ac @ M, always in fp32 operands: M = Sigmabar / (N-1) can be far below fp16's normal range
    p_sb = sbar_ptr + i_b * C * C
    for k0 in range(0, C, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        m_nk = m_n[:, None] & m_k[None, :]
        m_kc = m_k[:, None] & m_c[None, :]
        b_mu = tl.load(mean_ptr + i_b * C + o_k, mask=m_k, other=0.0)
        b_a = tl.load(a_ptr + i_b * s_ab + o_n[:, None] * s_an + o_k[None, :] * s_ac, mask=m_nk, other=0.0)
        b_a = tl.where(m_nk, b_a.to(tl.float32) - b_mu[None, :], 0.0)
        b_s = tl.load(p_sb + o_k[:, None] * C + o_c[None, :], mask=m_kc, other=0.0)
        b_st = tl.load(p_sb + o_c[None, :] * C + o_k[:, None], mask=m_kc, other=0.0)  # the tile of Sbar^T
        b_m = (b_s + b_st) * c_m + tl.where(m_kc & (o_k[:, None] == o_c[None, :]), c_d, 0.0)
        b_acc = tl.dot(b_a, b_m, b_acc, input_precision=PREC)
    tl.store(gx_ptr + i_b * s_xb + o_n[:, None] * s_xn + o_c[None, :] * s_xc,
             b_acc.to(gx_ptr.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])


def _blocks(N: int, C: int, prec: str):
    """(BLOCK_N, BLOCK_C, BLOCK_K) of the (N/BN, C/BC, B) grids; exact fp32 FMA products take smaller
    tiles (larger ones spilled). BLOCK_K is the interpreter's: the GPU autotunes it."""
    ieee = prec == "ieee"
    return block(N, gpu=32 if ieee else 64), block(C, gpu=64), block(C, gpu=16 if ieee else 32)


def _check_square(w: torch.Tensor, C: int) -> None:
    assert w.dtype == torch.float32 and w.shape[-2:] == (C, C) and w.stride(-2) == C and w.stride(-1) == 1, \
        (w.shape, w.stride(), w.dtype)


def apply_fwd(a, mean, w, tr, y_obs):
    """Write Y = (A - mean) w / sqrt(tr) into y_obs (the (B, N, C) view of y); return v (B, C) fp32,
    the unbiased column variances of the fp32 Y. w: (B, C, C) row-major, batch stride may be 0.
    2 launches."""
    B, N, C = a.shape
    _check_square(w, C)
    prec = dot_precision()
    bn, bc, bk = _blocks(N, C, prec)
    nn = triton.cdiv(N, bn)
    part = torch.empty(B, 2, nn, C, device=a.device, dtype=torch.float32)
    _apply_fwd_kernel[(nn, triton.cdiv(C, bc), B)](
        a, mean, w, tr, y_obs, part, N, C, *a.stride(), w.stride(0), *y_obs.stride(),
        BLOCK_N=bn, BLOCK_C=bc, HALF_DOT=half_dot(a.dtype, prec), PREC=prec, **tuned_kwargs(BLOCK_K=bk))
    v = torch.empty(B, C, device=a.device, dtype=torch.float32)
    bv = block(C, gpu=32, interp=1024)  # one warp per 32 columns: a few KB each, many programs
    _apply_fwd_var_kernel[(triton.cdiv(C, bv), B)](part, v, N, C, nn, BLOCK_C=bv, num_warps=1)
    return v


def apply_bwd(a, mean, w, tr, gy_obs, y_obs, gv, ns_bwd, gx_obs):
    """Write dL/dA into gx_obs, given the (B, N, C) views a, gy_obs, y_obs, gx_obs, mean (B, C) and tr (B,)
    contiguous fp32, w = P_T (B, C, C) row-major (batch stride may be 0) and gv = dL/dv (B, C).
    ns_bwd(G) -> (Sbar, ss): the Newton-Schulz backward, given G = dL/dP_T (B, C, C) (it may overwrite G):
    Sbar = dL/dS (B, C, C) fp32 contiguous and ss (B, n) fp32, partial sums of <Sbar, S>.
    Launches: partial (+ reduce when the rows are split), ns_bwd's, then dA."""
    B, N, C = a.shape
    _check_square(w, C)
    f32 = dict(device=a.device, dtype=torch.float32)
    prec = dot_precision()
    hd = half_dot(a.dtype, prec)
    gv = gv.to(torch.float32)  # no-op for the fp32 v's gradient; read through its strides
    c_v = 2.0 / (N - 1)
    # G = rs * Ac^T Ybar' over all (C/BC)^2 tiles, the rows split as the covariance's; 16-row steps for
    # sizes not multiples of 16 (32 spilled registers in the fp32 FINISH epilogue)
    al = aligned(N, C, *strides(a, gy_obs, y_obs))
    bcc, bnw = block(C, gpu=64), block(N, gpu=32 if al else 16)
    ntc = triton.cdiv(C, bcc)
    n_split, rows = split_rows(N, C, B, bnw, bcc, a.device, triangle=False)
    finish = n_split == 1
    # the reduce is a pure stream over the partials: smaller tiles than the products', more programs
    brc = block(C, gpu=32)
    ntr = ntc if finish else triton.cdiv(C, brc)
    G = torch.empty(B, C, C, **f32)
    ysum = torch.empty(B, C, **f32)
    gp = torch.empty(B, ntr * ntr, **f32)  # <G, P_T> per tile of the kernel that writes G
    part = G if finish else torch.empty(B, n_split, C, C, **f32)
    psum = ysum if finish else torch.empty(B, n_split, C, **f32)
    _apply_bwd_w_partial_kernel[(ntc, ntc, B * n_split)](
        a, mean, gy_obs, y_obs, gv, part, psum, w, tr, gp, N, C, n_split, rows, c_v,
        *a.stride(), *gy_obs.stride(), *y_obs.stride(), *gv.stride(), w.stride(0),
        BLOCK_C=bcc, BLOCK_N=bnw, HALF_DOT=hd, PREC=prec, FINISH=finish)
    if not finish:
        _apply_bwd_w_reduce_kernel[(ntr, ntr, B)](part, psum, w, tr, G, ysum, gp, C, n_split, w.stride(0),
                                                  BLOCK_C=brc, num_warps=num_warps(brc * brc))
    del part, psum
    Sbar, ss = ns_bwd(G)
    _check_square(Sbar, C)
    assert Sbar.is_contiguous() and ss.dtype == torch.float32 and ss.dim() == 2 and ss.shape[0] == B, \
        (Sbar.shape, ss.shape)
    bn, bc, bk = _blocks(N, C, prec)
    n_gp, n_ss = gp.shape[1], ss.shape[1]
    _apply_bwd_x_kernel[(triton.cdiv(N, bn), triton.cdiv(C, bc), B)](
        a, mean, gy_obs, y_obs, gv, tr, ysum, w, Sbar, gp, ss, gx_obs, N, C, n_gp, n_ss, c_v,
        *a.stride(), *gy_obs.stride(), *y_obs.stride(), *gv.stride(), w.stride(0), *ss.stride(), *gx_obs.stride(),
        BLOCK_N=bn, BLOCK_C=bc, BLOCK_R=_BLOCK_R, HALF_DOT=hd, PREC=prec,
        **tuned_kwargs(BLOCK_K=bk))


# ------------------------------------------------------------------ costs (covariance.py's rule)
def _bytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


def _apply_fwd_cost(k: dict, grid: tuple) -> Work:
    a, y, N, C = k["a_ptr"], k["y_ptr"], k["N"], k["C"]
    nn, nc, B = grid
    flops = 2.0 * B * nn * k["BLOCK_N"] * nc * k["BLOCK_C"] * C + 4.0 * B * N * C  # + scale and the two sums
    # a row tile of A is re-read by each column tile (grid axis 1), a view of A apart; W's column panel
    # is shared by the programs adjacent along axis 0
    a_b = reread_bytes(_bytes(a), nc, _bytes(a) / B)
    w_b = 4.0 * C * C * (B if k["s_wb"] else 1)
    return Work(flops, a_b + w_b + _bytes(y) + 4.0 * B * 2 * nn * C + 8.0 * B * C)


def _apply_fwd_var_cost(k: dict, grid: tuple) -> Work:
    B, C, n_tiles = grid[1], k["C"], k["n_tiles"]
    return Work(2.0 * B * n_tiles * C + 4.0 * B * C, 4.0 * B * (2 * n_tiles * C + C))


def _apply_bwd_w_partial_cost(k: dict, grid: tuple) -> Work:
    a, gy, y, N, C, n_split, bc = k["a_ptr"], k["gy_ptr"], k["y_ptr"], k["N"], k["C"], k["n_split"], k["BLOCK_C"]
    nt, B = grid[0], grid[2] // n_split
    flops = 2.0 * B * triton.cdiv(N, k["BLOCK_N"]) * k["BLOCK_N"] * (nt * bc) ** 2 + 3.0 * B * N * C * nt
    # A's column tile i is re-read by each j (axis 1), one chunk of rows apart; the Ybar' tile j (grad_y,
    # y) is shared by the programs adjacent along axis 0
    a_b = reread_bytes(_bytes(a), nt, min(k["rows_per_split"], N) * C * a.element_size())
    out = (4.0 * B * (C * C + C + nt * nt) + 4.0 * C * C * (B if k["s_wb"] else 1) if k["FINISH"]
           else 4.0 * B * n_split * (C * C + C))
    return Work(flops, a_b + _bytes(gy) + _bytes(y) + out + 8.0 * B * C)


def _apply_bwd_w_reduce_cost(k: dict, grid: tuple) -> Work:
    C, n_split = k["C"], k["n_split"]
    nt, B = grid[0], grid[2]
    reads = 4.0 * B * n_split * (C * C + C) + 4.0 * C * C * (B if k["s_wb"] else 1)
    return Work(1.0 * B * n_split * C * C + 3.0 * B * C * C, reads + 4.0 * B * (C * C + C + nt * nt))


def _apply_bwd_x_cost(k: dict, grid: tuple) -> Work:
    a, gy, y, gx, N, C = k["a_ptr"], k["gy_ptr"], k["y_ptr"], k["gx_ptr"], k["N"], k["C"]
    nn, nc, B = grid
    np_, cp = nn * k["BLOCK_N"], nc * k["BLOCK_C"]
    # two products, M's tiles formed per program (4 per element), Ybar' and its centring per program
    flops = 4.0 * B * np_ * cp * C + 4.0 * B * nn * C * cp + 4.0 * B * N * C * nc
    # A, grad_y, y row tiles are re-read by each column tile (axis 1), a view of all three apart; the
    # column panels of W, Sbar and the row panel of Sbar (its transposed tile) are shared along axis 0
    ins = _bytes(a) + _bytes(gy) + _bytes(y)
    in_b = reread_bytes(ins, nc, ins / B)
    mats = 4.0 * C * C * (B if k["s_wb"] else 1) + 2 * 4.0 * B * C * C
    small = 4.0 * B * (k["n_gp"] + k["n_ss"] + 3 * C)
    return Work(flops, in_b + mats + small + _bytes(gx))


COSTS: dict[str, Callable[[dict, tuple], Work]] = {
    "_apply_fwd_kernel": _apply_fwd_cost,
    "_apply_fwd_var_kernel": _apply_fwd_var_cost,
    "_apply_bwd_w_partial_kernel": _apply_bwd_w_partial_cost,
    "_apply_bwd_w_reduce_kernel": _apply_bwd_w_reduce_cost,
    "_apply_bwd_x_kernel": _apply_bwd_x_cost,
}
