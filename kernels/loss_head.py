"""The INTL loss head (docs/math.md §4.2): alignment + trace terms of intl_loss from the whitened views,
forward in 2 launches, backward in 1, no torch op besides allocation.

Inputs: y (K, m, d) the whitened views through their strides (any of fp16/bf16/fp32), v (K, C) their
output variances (fp32), and the pairs' common reference R (m, d): view 0 of y (no target) or the
whitened target (any float dtype, any strides). Pairs: (y_i, R) for i = FIRST .. K-1, FIRST = 1 without
a target and 0 with one, P = K - FIRST of them.

`_head_cos_kernel`, grid (m / BM, P): one pass over d accumulating <a_r, b_r>, |a_r|^2, |b_r|^2 in fp32
for its BM rows, then writes the sum over its rows of cos_r (norms clamped at 1e-12) to an fp32
partials buffer (P, m / BM).
`_head_finish_kernel`, one program: align = 2 - 2 / (m P) * (the partials summed in a fixed order);
TL_i = sum_j (v_ij - 1)^2; trace = sum_i w_i TL_i (w_0 = 1 without a target, 1/P otherwise);
loss = align + beta trace: three 0-dim fp32 outputs.
`_head_bwd_kernel`, grid (m / BM, K): the program of view i recomputes its rows' statistics and writes
dL/dy_i straight into the (K, m, d) output, in y's dtype:
  - a pair view:  g/P * dnmse(y_i, R)/dy_i = s (u_R - cos u_i) / |y_i| with s = -2 g / (m P);
  - view 0 as the reference (no target): sum over the pairs p = 1 .. K-1, in that order, of
    s (u_p - cos_p u_0) / |y_0|, accumulated in fp32 and rounded once (deterministic);
and the programs of row block 0 also write dL/dv_i = 2 beta g w_i (v_i - 1).
A clamped norm is a constant (its cos term dropped), as reference.nmse_bwd.
Grid: BM (kernels/nmse.py's rows_per_program) gives >= 2 programs per SM where m allows (1 row per
program for 2 views of 256 rows on the H200: 256 programs forward, 512 backward) with up to 1024 columns
per load; under the interpreter few large programs.
Bytes: the forward reads every view once (R's rows are re-read from L2 by the P programs of a row
block) and v once; the backward reads them again (its second sweep over a program's rows from L2) and
writes dy and dv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Work, block
from .nmse import NORM_EPS, _row_stats, rows_per_program

# elements of one (rows x columns) load: rows per program at most _TILE / BLOCK_D (4096 took up to 255
# registers per thread, fewer programs resident per SM for these memory-bound kernels)
_TILE = 2048


@triton.jit
def _head_cos_kernel(
    y_ptr,  # (K, m, d), strides (s_yk, s_ym, s_yd)
    r_ptr,  # (m, d) the pairs' reference (view 0 of y, or the target), strides (s_rm, s_rd)
    part_ptr,  # (P, n_rb) fp32, written: sum over the program's rows of cos
    m, d, n_rb, s_yk, s_ym, s_yd, s_rm, s_rd, eps,
    FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_rb, i_p = tl.program_id(0), tl.program_id(1)
    o_m = (i_rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < m
    p_a = y_ptr + (i_p + FIRST).to(tl.int64) * s_yk
    b_ab, b_aa, b_bb = _row_stats(p_a, r_ptr, o_m, m_m, d, s_ym, s_yd, s_rm, s_rd, BLOCK_M, BLOCK_D)
    b_cos = b_ab / (tl.maximum(tl.sqrt(b_aa), eps) * tl.maximum(tl.sqrt(b_bb), eps))
    tl.store(part_ptr + i_p * n_rb + i_rb, tl.sum(tl.where(m_m, b_cos, 0.0), axis=0))


@triton.jit
def _head_finish_kernel(
    part_ptr,  # (P * n_rb,) fp32 partial sums of cos
    v_ptr,  # (K, C) fp32, strides (s_vk, s_vc)
    loss_ptr, align_ptr, trace_ptr,  # 0-dim fp32, written
    n_part, m, P, K, C, s_vk, s_vc, w0, beta,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b_cos = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(0, n_part, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        b_cos += tl.load(part_ptr + o_r, mask=o_r < n_part, other=0.0)
    align = 2.0 - 2.0 * tl.sum(b_cos, axis=0) / (m * P)
    inv_p = 1.0 / P
    b_tl = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, K):
        w = tl.where(i == 0, w0, inv_p)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            b_x = tl.load(v_ptr + i * s_vk + o_c * s_vc, mask=o_c < C, other=1.0).to(tl.float32) - 1.0
            b_tl += w * (b_x * b_x)
    trace = tl.sum(b_tl, axis=0)
    tl.store(align_ptr, align)
    tl.store(trace_ptr, trace)
    tl.store(loss_ptr, align + beta * trace)


@triton.jit
def _pair_grad(p_a, r_ptr, p_g, o_m, m_m, d, s_ym, s_yd, s_rm, s_rd, scale, eps,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/da for the pair (a, R) of these rows: scale (u_R - cos u_a) / |a|, written at p_g (contiguous rows)."""
    b_ab, b_aa, b_bb = _row_stats(p_a, r_ptr, o_m, m_m, d, s_ym, s_yd, s_rm, s_rd, BLOCK_M, BLOCK_D)
    na_raw, nb_raw = tl.sqrt(b_aa), tl.sqrt(b_bb)
    na, nb = tl.maximum(na_raw, eps), tl.maximum(nb_raw, eps)
    b_cos = b_ab / (na * nb)
    ca = scale / (na * nb)  # on R
    caa = scale * tl.where(na_raw > eps, b_cos, 0.0) / (na * na)  # on a
    for d0 in range(0, d, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < d)[None, :]
        b_a = tl.load(p_a + o_m[:, None] * s_ym + o_d[None, :] * s_yd, mask=m_md, other=0.0).to(tl.float32)
        b_b = tl.load(r_ptr + o_m[:, None] * s_rm + o_d[None, :] * s_rd, mask=m_md, other=0.0).to(tl.float32)
        b_g = ca[:, None] * b_b - caa[:, None] * b_a
        tl.store(p_g + o_m[:, None] * d + o_d[None, :], b_g.to(p_g.dtype.element_ty), mask=m_md)


@triton.jit
def _reference_grad(y_ptr, p_g, o_m, m_m, d, K, s_yk, s_ym, s_yd, scale, eps,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dy_0 for view 0 as the reference of the pairs (y_p, y_0), p = 1 .. K-1: the sum over p, in order,
    of scale (u_p - cos_p u_0) / |y_0|, in fp32. Per-pair row statistics live in (BLOCK_M, BLOCK_K) tiles."""
    o_k = tl.arange(0, BLOCK_K)
    b_ab = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    b_aa = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    b_bb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < d)[None, :]
        o_md = o_m[:, None] * s_ym + o_d[None, :] * s_yd
        b_b = tl.load(y_ptr + o_md, mask=m_md, other=0.0).to(tl.float32)
        b_bb += tl.sum(b_b * b_b, axis=1)
        for p in range(1, K):
            b_a = tl.load(y_ptr + p * s_yk + o_md, mask=m_md, other=0.0).to(tl.float32)
            sel = (o_k == p)[None, :]
            b_ab += tl.where(sel, tl.sum(b_a * b_b, axis=1)[:, None], 0.0)
            b_aa += tl.where(sel, tl.sum(b_a * b_a, axis=1)[:, None], 0.0)
    nb_raw = tl.sqrt(b_bb)
    nb = tl.maximum(nb_raw, eps)
    na = tl.maximum(tl.sqrt(b_aa), eps)
    b_cos = b_ab / (na * nb[:, None])
    valid = ((o_k >= 1) & (o_k < K))[None, :]
    c_a = tl.where(valid, scale / (na * nb[:, None]), 0.0)  # on y_p
    c_b = tl.sum(tl.where(valid, b_cos, 0.0), axis=1)  # sum_p cos_p
    c_b = scale * tl.where(nb_raw > eps, c_b, 0.0) / (nb * nb)  # on y_0
    for d0 in range(0, d, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < d)[None, :]
        o_md = o_m[:, None] * s_ym + o_d[None, :] * s_yd
        b_g = -c_b[:, None] * tl.load(y_ptr + o_md, mask=m_md, other=0.0).to(tl.float32)
        for p in range(1, K):
            b_a = tl.load(y_ptr + p * s_yk + o_md, mask=m_md, other=0.0).to(tl.float32)
            b_g += tl.sum(tl.where((o_k == p)[None, :], c_a, 0.0), axis=1)[:, None] * b_a
        tl.store(p_g + o_m[:, None] * d + o_d[None, :], b_g.to(p_g.dtype.element_ty), mask=m_md)


@triton.jit
def _head_bwd_kernel(
    g_ptr,  # 0-dim upstream gradient of the loss
    y_ptr,  # (K, m, d), strides (s_yk, s_ym, s_yd)
    r_ptr,  # (m, d) the pairs' reference, strides (s_rm, s_rd)
    v_ptr,  # (K, C), strides (s_vk, s_vc)
    dy_ptr,  # (K, m, d) contiguous, y's dtype, written
    dv_ptr,  # (K, C) contiguous, v's dtype, written by the programs of row block 0
    m, d, K, C, s_yk, s_ym, s_yd, s_rm, s_rd, s_vk, s_vc, P, w0, beta, eps,
    HAS_TARGET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    i_rb, i_v = tl.program_id(0), tl.program_id(1)
    o_m = (i_rb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < m
    g = tl.load(g_ptr).to(tl.float32)
    scale = -2.0 * g / (m * P)
    i_v64 = i_v.to(tl.int64)
    p_g = dy_ptr + i_v64 * m * d
    if HAS_TARGET:
        _pair_grad(y_ptr + i_v64 * s_yk, r_ptr, p_g, o_m, m_m, d, s_ym, s_yd, s_rm, s_rd, scale, eps, BLOCK_M, BLOCK_D)
    else:
        if i_v == 0:
            _reference_grad(y_ptr, p_g, o_m, m_m, d, K, s_yk, s_ym, s_yd, scale, eps, BLOCK_M, BLOCK_D, BLOCK_K)
        else:
            _pair_grad(y_ptr + i_v64 * s_yk, r_ptr, p_g, o_m, m_m, d, s_ym, s_yd, s_rm, s_rd, scale, eps,
                       BLOCK_M, BLOCK_D)
    if i_rb == 0:
        coef = 2.0 * beta * g * tl.where(i_v == 0, w0, 1.0 / P)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            b_v = tl.load(v_ptr + i_v64 * s_vk + o_c * s_vc, mask=m_c, other=1.0).to(tl.float32)
            tl.store(dv_ptr + i_v64 * C + o_c, (coef * (b_v - 1.0)).to(dv_ptr.dtype.element_ty), mask=m_c)


# ------------------------------------------------------------------ launchers
def _shape(y: torch.Tensor, v: torch.Tensor, target: torch.Tensor | None):
    """(K, m, d, C, P, FIRST, R, w0) of a head call, validated."""
    if y.dim() != 3 or v.dim() != 2 or v.shape[0] != y.shape[0]:
        raise ValueError(f"y must be (K, m, d) and v (K, C), got {tuple(y.shape)} and {tuple(v.shape)}")
    K, m, d = y.shape
    if target is None:
        if K < 2:
            raise ValueError(f"without a target the head needs K >= 2 views, got {K}")
        first, ref = 1, y[0]
    else:
        if tuple(target.shape) != (m, d):
            raise ValueError(f"target must be (m, d) = {(m, d)}, got {tuple(target.shape)}")
        first, ref = 0, target
    P = K - first
    return K, m, d, v.shape[1], P, first, ref, (1.0 if target is None else 1.0 / P)


def _blocks(y: torch.Tensor, ref: torch.Tensor, batch: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the row-block kernels over `batch` x m rows."""
    _, m, d = y.shape
    bd = block(d, gpu=1024, interp=1024)
    bm = rows_per_program(m, batch, y.device, gpu_max=max(1, _TILE // bd))
    return bm, bd, 4  # 4 warps: <= 16 elements of a tile per thread; 8 spill at unaligned d (bench/aot_compile.py)


def head_fwd(y: torch.Tensor, v: torch.Tensor, target: torch.Tensor | None, beta: float):
    """(loss, align, trace), 0-dim fp32, of the views y (K, m, d) with variances v (K, C) (module docstring)."""
    K, m, d, C, P, first, ref, w0 = _shape(y, v, target)
    bm, bd, warps = _blocks(y, ref, P)
    n_rb = triton.cdiv(m, bm)
    part = torch.empty(P * n_rb, device=y.device, dtype=torch.float32)
    loss, align, trace = (torch.empty((), device=y.device, dtype=torch.float32) for _ in range(3))
    _head_cos_kernel[(n_rb, P)](y, ref, part, m, d, n_rb, *y.stride(), *ref.stride(), NORM_EPS,
                                FIRST=first, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps)
    _head_finish_kernel[(1,)](part, v, loss, align, trace, P * n_rb, m, P, K, C, *v.stride(), w0, float(beta),
                              BLOCK_R=block(P * n_rb, gpu=1024, interp=1024), BLOCK_C=block(C, gpu=1024, interp=1024))
    return loss, align, trace


def head_bwd(grad: torch.Tensor, y: torch.Tensor, v: torch.Tensor, target: torch.Tensor | None, beta: float):
    """(dL/dy (K, m, d) contiguous in y's dtype, dL/dv (K, C) in v's dtype) for grad = dL/dloss (0-dim)."""
    K, m, d, C, P, first, ref, w0 = _shape(y, v, target)
    bm, bd, warps = _blocks(y, ref, K)
    dy = torch.empty((K, m, d), device=y.device, dtype=y.dtype)
    dv = torch.empty((K, C), device=v.device, dtype=v.dtype)
    _head_bwd_kernel[(triton.cdiv(m, bm), K)](
        grad, y, ref, v, dy, dv, m, d, K, C, *y.stride(), *ref.stride(), *v.stride(), P, w0, float(beta), NORM_EPS,
        HAS_TARGET=target is not None, BLOCK_M=bm, BLOCK_D=bd, BLOCK_K=triton.next_power_of_2(max(K, 2)),
        BLOCK_C=block(C, gpu=1024, interp=1024), num_warps=warps)
    return dy, dv


# ------------------------------------------------------------------ performance model (bench/model.py)
# What each launch does, from its bound arguments (by parameter name) and grid. Bytes are HBM traffic.
# Assumption (as kernels/nmse.py): R's rows, read by the P (forward) or K (backward) programs of a row
# block, come from HBM once and from L2 after; each backward program's second sweep over its rows hits L2.
def _bytes(t) -> float:
    return t.numel() * t.element_size()


def _views_bytes(args: dict, has_target: bool) -> float:
    """HBM bytes of reading every view once, plus the target (a separate tensor) when there is one."""
    return _bytes(args["y_ptr"]) + (_bytes(args["r_ptr"]) if has_target else 0.0)


def _head_cos_work(args: dict, grid: tuple[int, int, int]) -> Work:
    y = args["y_ptr"]
    pairs = grid[1]
    pair_elems = pairs * y.shape[1] * y.shape[2]
    return Work(flops=6.0 * pair_elems,  # <a, b>, |a|^2, |b|^2: three multiply-adds per element of each pair
                bytes=_views_bytes(args, args["FIRST"] == 0) + _bytes(args["part_ptr"]))


def _head_finish_work(args: dict, grid: tuple[int, int, int]) -> Work:
    v = args["v_ptr"]
    return Work(flops=float(args["n_part"] + 3 * v.numel()), bytes=_bytes(args["part_ptr"]) + _bytes(v) + 12.0)


def _head_bwd_work(args: dict, grid: tuple[int, int, int]) -> Work:
    y, v = args["y_ptr"], args["v_ptr"]
    elems = y.shape[0] * y.shape[1] * y.shape[2]
    return Work(flops=10.0 * elems,  # the statistics' 6 per element, then 2 (a gradient) + 2 (view 0's sums)
                bytes=_views_bytes(args, args["HAS_TARGET"]) + _bytes(args["dy_ptr"]) + _bytes(v)
                + _bytes(args["dv_ptr"]))


COSTS = {"_head_cos_kernel": _head_cos_work, "_head_finish_kernel": _head_finish_work,
         "_head_bwd_kernel": _head_bwd_work}
