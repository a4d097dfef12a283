"""Alignment term nmse(a, b) = 2 - 2 mean_i cos(a_i, b_i), forward and backward (docs/math.md §4).

Design: a, b (B, m, d) through their strides (b is often a stride-0 broadcast of view 0), rows are
samples. `_nmse_fwd_kernel`, grid (m/BM, B): one pass over d accumulating <a_i, b_i>, |a_i|^2,
|b_i|^2 in fp32 and storing cos_i; the mean over the m rows is a (B, m) sum on the host.
`_nmse_bwd_kernel`, same grid: the same pass, then a second sweep over the program's rows (still in
L1/L2) writing ga = s (ub - cos ua) / |a|, gb = s (ua - cos ub) / |b| with s = -2 grad / m. Norms are
clamped at 1e-12 as torch.nn.functional.normalize does; a clamped norm is a constant (no cos term).
Bytes: fwd reads a and b once; bwd reads them twice (the second time from cache) and writes ga, gb.
Grid: BM (`rows_per_program`) is the largest power of two up to 4 that still gives B m / BM >= 2 x the
GPU's SMs (1 row per program when even that is fewer): these kernels are memory-bound, and with 4 rows
per program 2 views of 256 rows filled 64 of the H200's 132 SMs. (intl_loss uses kernels/loss_head.py.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Work, block, small_blocks, sm_count

NORM_EPS = 1e-12


@triton.jit
def _row_stats(a_ptr, b_ptr, o_m, m_m, d, s_am, s_ad, s_bm, s_bd, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row <a, b>, |a|^2, |b|^2 for the rows o_m, fp32."""
    b_ab = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_aa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_bb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < d)[None, :]
        b_a = tl.load(a_ptr + o_m[:, None] * s_am + o_d[None, :] * s_ad, mask=m_md, other=0.0).to(tl.float32)
        b_b = tl.load(b_ptr + o_m[:, None] * s_bm + o_d[None, :] * s_bd, mask=m_md, other=0.0).to(tl.float32)
        b_ab += tl.sum(b_a * b_b, axis=1)
        b_aa += tl.sum(b_a * b_a, axis=1)
        b_bb += tl.sum(b_b * b_b, axis=1)
    return b_ab, b_aa, b_bb


@triton.jit
def _nmse_fwd_kernel(
    a_ptr, b_ptr,  # (B, m, d), strides (s_ab, s_am, s_ad), (s_bb, s_bm, s_bd)
    cos_ptr,  # (B, m) fp32, written
    m, d, s_ab, s_am, s_ad, s_bb, s_bm, s_bd, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_m, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < m
    b_ab, b_aa, b_bb = _row_stats(a_ptr + i_b * s_ab, b_ptr + i_b * s_bb, o_m, m_m, d,
                                  s_am, s_ad, s_bm, s_bd, BLOCK_M, BLOCK_D)
    b_cos = b_ab / (tl.maximum(tl.sqrt(b_aa), eps) * tl.maximum(tl.sqrt(b_bb), eps))
    tl.store(cos_ptr + i_b * m + o_m, b_cos, mask=m_m)


@triton.jit
def _nmse_bwd_kernel(
    g_ptr,  # upstream gradient (B,) fp32
    a_ptr, b_ptr,  # (B, m, d) strided as in the forward
    ga_ptr, gb_ptr,  # (B, m, d) contiguous, a's / b's dtype, written
    m, d, s_ab, s_am, s_ad, s_bb, s_bm, s_bd, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_m, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_m = o_m < m
    p_a, p_b = a_ptr + i_b * s_ab, b_ptr + i_b * s_bb
    b_ab, b_aa, b_bb = _row_stats(p_a, p_b, o_m, m_m, d, s_am, s_ad, s_bm, s_bd, BLOCK_M, BLOCK_D)
    na_raw, nb_raw = tl.sqrt(b_aa), tl.sqrt(b_bb)
    na, nb = tl.maximum(na_raw, eps), tl.maximum(nb_raw, eps)
    b_cos = b_ab / (na * nb)
    scale = -2.0 * tl.load(g_ptr + i_b) / m
    # ga = s (b/|b| - cos a/|a|) / |a| = ca * b - caa * a, likewise gb
    ca = scale / (na * nb)
    caa = scale * tl.where(na_raw > eps, b_cos, 0.0) / (na * na)
    cbb = scale * tl.where(nb_raw > eps, b_cos, 0.0) / (nb * nb)
    p_ga, p_gb = ga_ptr + i_b * m * d, gb_ptr + i_b * m * d
    for d0 in range(0, d, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < d)[None, :]
        b_a = tl.load(p_a + o_m[:, None] * s_am + o_d[None, :] * s_ad, mask=m_md, other=0.0).to(tl.float32)
        b_b = tl.load(p_b + o_m[:, None] * s_bm + o_d[None, :] * s_bd, mask=m_md, other=0.0).to(tl.float32)
        b_ga = ca[:, None] * b_b - caa[:, None] * b_a
        b_gb = ca[:, None] * b_a - cbb[:, None] * b_b
        o_md = o_m[:, None] * d + o_d[None, :]
        tl.store(p_ga + o_md, b_ga.to(ga_ptr.dtype.element_ty), mask=m_md)
        tl.store(p_gb + o_md, b_gb.to(gb_ptr.dtype.element_ty), mask=m_md)


def rows_per_program(m: int, batch: int, device: torch.device, gpu_max: int = 4, interp: int = 64) -> int:
    """BLOCK_M of a row-block kernel over `batch` x m rows: under the interpreter few large programs
    (up to `interp` rows); on the GPU the largest power of two <= gpu_max with batch * cdiv(m, BLOCK_M)
    >= 2 x SMs (enough programs to fill the GPU), else 1."""
    if small_blocks():
        return block(m, gpu=gpu_max, interp=interp, lo=1)
    want = 2 * sm_count(device)
    bm = max(1, min(gpu_max, triton.next_power_of_2(m)))
    while bm > 1 and batch * triton.cdiv(m, bm) < want:
        bm //= 2
    return bm


def _blocks(B: int, m: int, d: int, device: torch.device):
    return rows_per_program(m, B, device), block(d, gpu=1024, interp=1024)


def nmse_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (B, m, d) -> 2 - 2 mean_i cos(a_i, b_i), shape (B,) fp32."""
    B, m, d = a.shape
    bm, bd = _blocks(B, m, d, a.device)
    cos = torch.empty(B, m, device=a.device, dtype=torch.float32)
    _nmse_fwd_kernel[(triton.cdiv(m, bm), B)](a, b, cos, m, d, *a.stride(), *b.stride(), NORM_EPS,
                                              BLOCK_M=bm, BLOCK_D=bd)
    return 2.0 - 2.0 * cos.mean(-1)


def nmse_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """(d/da, d/db) of grad . nmse(a, b), contiguous, in a's and b's dtypes."""
    B, m, d = a.shape
    bm, bd = _blocks(B, m, d, a.device)
    ga = torch.empty(B, m, d, device=a.device, dtype=a.dtype)
    gb = torch.empty(B, m, d, device=b.device, dtype=b.dtype)
    g = grad.to(torch.float32).reshape(B).contiguous()
    _nmse_bwd_kernel[(triton.cdiv(m, bm), B)](g, a, b, ga, gb, m, d, *a.stride(), *b.stride(), NORM_EPS,
                                              BLOCK_M=bm, BLOCK_D=bd)
    return ga, gb


# ------------------------------------------------------------------ performance model (bench/model.py)
# What each launch does, from its bound arguments (by parameter name) and grid. Bytes are HBM traffic.
# Assumption: a broadcast operand (batch stride 0, e.g. view 0 against every other view) is read from
# HBM once and re-read from L2 by the other batch entries while it fits in half the H200's 60 MB L2;
# the backward's second sweep over a program's rows hits L2 (it read them just before).
_L2_REREAD_MAX_BYTES = 30e6


def _read_bytes(t) -> float:
    """HBM bytes of reading the (B, m, d) operand t once per batch entry."""
    one = t.numel() // max(t.shape[0], 1) * t.element_size()
    if t.stride(0) == 0 and one <= _L2_REREAD_MAX_BYTES:
        return one
    return t.shape[0] * one


def _nmse_fwd_work(args: dict, grid: tuple[int, int, int]) -> Work:
    a, b = args["a_ptr"], args["b_ptr"]
    return Work(flops=6.0 * a.numel(),  # three multiply-adds per element: <a, b>, |a|^2, |b|^2
                bytes=_read_bytes(a) + _read_bytes(b) + args["cos_ptr"].numel() * 4)


def _nmse_bwd_work(args: dict, grid: tuple[int, int, int]) -> Work:
    a, b, ga, gb = args["a_ptr"], args["b_ptr"], args["ga_ptr"], args["gb_ptr"]
    return Work(flops=10.0 * a.numel(),  # the forward's 6, then 2 per element for each of ga, gb
                bytes=_read_bytes(a) + _read_bytes(b) + ga.numel() * ga.element_size() + gb.numel() * gb.element_size())


COSTS = {"_nmse_fwd_kernel": _nmse_fwd_work, "_nmse_bwd_kernel": _nmse_bwd_work}
