"""Column means, covariance Sigma = Ac^T Ac / (N - 1), trace and S = Sigma / tr (docs/math.md §3).

Design
- Input: the (B, N, C) observation view A of x (A = x for axis=1, A = x^T for axis=0), read through
  its strides in the input dtype (fp32/bf16/fp16) and upcast to fp32 in registers: no transposed copy.
- Shift. Every row is shifted by s = the mean of the first SHIFT_ROWS observations before the
  product, Sigma = ((A-s)^T (A-s) - (1^T (A-s))^T (1^T (A-s)) / N) / (N-1). |mu - s| is a fraction of
  the spread, so the correction is small and does not cancel the way A^T A - N mu mu^T would for a
  large mean. Every program computes s for its columns from the same loads in the same order, so all
  programs agree on it bit for bit.
- Split N (`split_rows`, shared with the apply backward). The rows are cut into n_split chunks of at
  most MAX_SPLIT_ROWS, and into as many chunks as tiles x chunks fit in one wave of the GPU (2 programs
  per SM of `_common.sm_count`), with the partials capped at MAX_PARTIAL_BYTES; `_cov_partial_kernel`, grid
  (C/BC, C/BC, B * n_split), program (i, j, b, k) with i <= j sums chunk k of one upper-triangle tile
  (about half the FLOPs of a full product) and its shifted column sums into fp32 partial buffers.
  Short sequential sums keep the fp32 error near that of a blocked BLAS product instead of growing
  with N. Autotuned on the GPU (num_warps, num_stages; the grid's block sizes stay the launcher's).
- `_cov_reduce_kernel`, grid (C/RC, C/RC, B), tiles RC <= BC (more programs for a memory-bound pass):
  sums the partials in chunk order (deterministic) and applies the correction; tr = sum_j Sigma_jj,
  which every program re-sums from the partials' diagonals (n_split x C numbers, from L2: no
  cross-program reduction, no separate pass over Sigma); stores S = Sigma / tr (0 where tr = 0:
  constant input) and P_1 = 1.5 I - 0.5 S in closed form, each tile with its mirror (the diagonal
  tile once, made exactly symmetric), and in the diagonal programs the means s + sum/N.
Launches: 2. FLOPs (multiply-add = 2): ~N C^2 (the triangle) + O(n_split C^2) for the reduce.
Bytes per view: A once (each chunk stays in L2 while its tiles re-read it), n_split C^2 / 2 fp32
partials written and read, S and P_1 written.

COSTS (for bench/model.py) maps each kernel's name to a function of (bound arguments by parameter name,
grid) returning `_common.Work(flops, bytes)`. FLOPs count whole tiles (what the hardware runs), a
multiply-add as 2. Bytes are global-memory traffic, by one rule (`_common.reread_bytes`): an operand
that several programs of the grid read is counted once if the span the grid walks between two reads of
the same tile (one chunk of rows of one view for the split kernels, one view otherwise) is at most
_common.L2_RESIDENT_BYTES (about half the L2), which then stays in L2; else once per read. Tiles
shared by programs adjacent along grid axis 0 (which run at the same time) count once. Small
per-program vectors (means, traces, partial sums) count once.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from ._common import (Work, aligned, autotune, block, cc_tile, dot_acc, dot_precision, gpu_configs,
                      guarded_inverse, half_dot, num_warps, prune_spills, reread_bytes, sm_count)

# Longest run of rows one program sums sequentially (the fp32 error grows with it).
MAX_SPLIT_ROWS = 2048
# Observations averaged for the shift.
SHIFT_ROWS = 64
# The partial tiles may take at most this many bytes (splits are reduced to fit).
MAX_PARTIAL_BYTES = 256 * 2**20
# Programs per SM the split aims for (two resident programs hide each other's load latency).
PROGRAMS_PER_SM = 2
@triton.jit
def _shift(p_a, o_c, m_c, N, s_an, s_ac, SHIFT_ROWS: tl.constexpr):
    """Mean of the first min(N, SHIFT_ROWS) rows of the columns o_c, fp32."""
    o_n = tl.arange(0, SHIFT_ROWS)
    m = (o_n < N)[:, None] & m_c[None, :]
    b_a = tl.load(p_a + o_n[:, None] * s_an + o_c[None, :] * s_ac, mask=m, other=0.0).to(tl.float32)
    return tl.sum(b_a, axis=0) / tl.minimum(N, SHIFT_ROWS)


# Idempotent (autotune runs it several times): it only writes part, psum and shift, never reads them.
@autotune(gpu_configs(),
          key=["N", "C", "n_split", "s_an", "s_ac", "BLOCK_C", "BLOCK_N", "HALF_DOT", "PREC"],
          prune=prune_spills(lambda kw: kw["BLOCK_C"] ** 2, ("N", "C", "s_ab", "s_an", "s_ac")))
@triton.jit
def _cov_partial_kernel(
    a_ptr,  # A (B, N, C), input dtype, strides (s_ab, s_an, s_ac)
    part_ptr,  # partial products (B, n_split, C, C) fp32, contiguous; upper tiles written
    psum_ptr,  # partial shifted column sums (B, n_split, C) fp32, contiguous
    shift_ptr,  # s (B, C) fp32, written by the diagonal programs of chunk 0
    N, C, n_split, rows_per_split, s_ab, s_an, s_ac,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, SHIFT_ROWS: tl.constexpr,
    HALF_DOT: tl.constexpr, PREC: tl.constexpr,
):
    i_i, i_j, i_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_k = (i_z // n_split).to(tl.int64), i_z % n_split
    if i_i <= i_j:  # upper triangle of tiles only; the reduce kernel stores the mirror
        o_i, o_j, m_i, m_j = cc_tile(i_i, i_j, C, BLOCK_C)
        p_a = a_ptr + i_b * s_ab
        b_si = _shift(p_a, o_i, m_i, N, s_an, s_ac, SHIFT_ROWS)
        b_sj = _shift(p_a, o_j, m_j, N, s_an, s_ac, SHIFT_ROWS)
        b_acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        b_sum_i = tl.zeros((BLOCK_C,), dtype=tl.float32)
        n_lo = i_k * rows_per_split
        n_hi = tl.minimum(N, n_lo + rows_per_split)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            m_n = o_n < n_hi
            m_ni = m_n[:, None] & m_i[None, :]
            m_nj = m_n[:, None] & m_j[None, :]
            b_ai = tl.load(p_a + o_n[:, None] * s_an + o_i[None, :] * s_ac, mask=m_ni, other=0.0).to(tl.float32)
            b_aj = tl.load(p_a + o_n[:, None] * s_an + o_j[None, :] * s_ac, mask=m_nj, other=0.0).to(tl.float32)
            b_ai = tl.where(m_ni, b_ai - b_si[None, :], 0.0)
            b_aj = tl.where(m_nj, b_aj - b_sj[None, :], 0.0)
            b_acc = dot_acc(tl.trans(b_ai), b_aj, b_acc, a_ptr.dtype.element_ty, HALF_DOT, PREC)
            b_sum_i += tl.sum(b_ai, axis=0)
        p_part = part_ptr + (i_b * n_split + i_k) * C * C
        tl.store(p_part + o_i[:, None] * C + o_j[None, :], b_acc, mask=m_i[:, None] & m_j[None, :])
        if i_i == i_j:
            tl.store(psum_ptr + (i_b * n_split + i_k) * C + o_i, b_sum_i, mask=m_i)
            if i_k == 0:
                tl.store(shift_ptr + i_b * C + o_i, b_si, mask=m_i)


@triton.jit
def _cov_trace(part_ptr, psum_ptr, i_b, N, C, n_split, BLOCK_R: tl.constexpr):
    """tr = sum_j Sigma_jj from the partials' diagonals: each Sigma_jj is summed over the chunks in the
    same order and with the same expression as the tiles' diagonal entries, so every program gets the
    same bits without waiting for another."""
    b_tr = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_R):
        o_c = c0 + tl.arange(0, BLOCK_R)
        m_c = o_c < C
        b_d = tl.zeros((BLOCK_R,), dtype=tl.float32)
        b_s = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(0, n_split):
            b_d += tl.load(part_ptr + (i_b * n_split + k) * C * C + o_c * (C + 1), mask=m_c, other=0.0)
            b_s += tl.load(psum_ptr + (i_b * n_split + k) * C + o_c, mask=m_c, other=0.0)
        b_tr += tl.where(m_c, (b_d - b_s * (b_s / N)) / (N - 1), 0.0)
    return tl.sum(b_tr, axis=0)


@triton.jit
def _cov_reduce_kernel(
    part_ptr, psum_ptr, shift_ptr,  # as written by _cov_partial_kernel
    s_ptr,  # S = Sigma / tr (B, C, C) fp32, contiguous, written
    mean_ptr,  # column means (B, C) fp32, written by the diagonal programs
    tr_ptr,  # tr (B,) fp32, written by program (0, 0)
    p1_ptr,  # P_1 (B, C, C) fp32 with batch stride s_pb, row stride C (if HAS_P1)
    N, C, n_split, s_pb,
    HAS_P1: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i_i, i_j, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    if i_i <= i_j:
        tr = _cov_trace(part_ptr, psum_ptr, i_b, N, C, n_split, BLOCK_R)
        if (i_i == 0) & (i_j == 0):
            tl.store(tr_ptr + i_b, tr)
        o_i, o_j, m_i, m_j = cc_tile(i_i, i_j, C, BLOCK_C)
        m_ij = m_i[:, None] & m_j[None, :]
        b_acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        b_sum_i = tl.zeros((BLOCK_C,), dtype=tl.float32)
        b_sum_j = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for k in range(0, n_split):  # fixed order: deterministic
            p_part = part_ptr + (i_b * n_split + k) * C * C
            b_acc += tl.load(p_part + o_i[:, None] * C + o_j[None, :], mask=m_ij, other=0.0)
            p_sum = psum_ptr + (i_b * n_split + k) * C
            b_sum_i += tl.load(p_sum + o_i, mask=m_i, other=0.0)
            b_sum_j += tl.load(p_sum + o_j, mask=m_j, other=0.0)
        b_sig = (b_acc - b_sum_i[:, None] * (b_sum_j[None, :] / N)) / (N - 1)
        b_s = b_sig * guarded_inverse(tr)  # 0 for a constant input (tr = 0)
        p_s = s_ptr + i_b * C * C
        p_p = p1_ptr + i_b * s_pb
        o_ij, o_ji = o_i[:, None] * C + o_j[None, :], o_j[None, :] * C + o_i[:, None]
        if i_i == i_j:
            # one store of an exactly symmetric tile: the upper half mirrored
            b_s = tl.where(o_i[:, None] <= o_j[None, :], b_s, tl.trans(b_s))
            tl.store(p_s + o_ij, b_s, mask=m_ij)
            if HAS_P1:
                tl.store(p_p + o_ij, tl.where(o_i[:, None] == o_j[None, :], 1.5, 0.0) - 0.5 * b_s, mask=m_ij)
            b_sh = tl.load(shift_ptr + i_b * C + o_i, mask=m_i, other=0.0)
            tl.store(mean_ptr + i_b * C + o_i, b_sh + b_sum_i / N, mask=m_i)
        else:
            tl.store(p_s + o_ij, b_s, mask=m_ij)
            tl.store(p_s + o_ji, b_s, mask=m_ij)  # mirror: S[j, i] = S[i, j]
            if HAS_P1:
                tl.store(p_p + o_ij, -0.5 * b_s, mask=m_ij)
                tl.store(p_p + o_ji, -0.5 * b_s, mask=m_ij)


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU (PROGRAMS_PER_SM per SM of `_common.sm_count`); 1 where programs run one
    by one (sm_count 1: the interpreter, unless a GPU is assumed), where more only cost time."""
    sms = sm_count(device)
    return 1 if sms == 1 else PROGRAMS_PER_SM * sms


def split_rows(N: int, C: int, B: int, bn: int, bc: int, device: torch.device,
               triangle: bool = True) -> tuple[int, int]:
    """(n_split, rows_per_split): chunks of at most MAX_SPLIT_ROWS rows (a multiple of bn), and as many
    as fit with the tiles in one wave of the GPU's program slots (rounded down: a few more programs than
    slots would cost a second, nearly empty wave); (B, n_split, C, C) fp32 partials within
    MAX_PARTIAL_BYTES. The tiles are the upper triangle of (C/bc)^2 (`triangle`) or all of them."""
    nt = triton.cdiv(C, bc)
    tiles = (nt * (nt + 1) // 2 if triangle else nt * nt) * B
    n_split = max(triton.cdiv(N, MAX_SPLIT_ROWS), _target_programs(device) // tiles)
    n_split = min(n_split, triton.cdiv(N, bn), max(1, MAX_PARTIAL_BYTES // (4 * B * C * C)))
    rows = triton.cdiv(triton.cdiv(N, n_split), bn) * bn
    return triton.cdiv(N, rows), rows


def covariance_fwd(a: torch.Tensor, p1: torch.Tensor | None = None):
    """a: the (B, N, C) observation view (any strides). Returns (mean (B,C), S (B,C,C), tr (B,)) in fp32;
    writes P_1 = 1.5 I - 0.5 S into `p1` (a (B, C, C) view with row stride C, unit column stride) if given."""
    B, N, C = a.shape
    f32 = dict(device=a.device, dtype=torch.float32)
    bc = block(C, gpu=64)
    bn = block(N, gpu=32)
    nt = triton.cdiv(C, bc)
    n_split, rows = split_rows(N, C, B, bn, bc, a.device)
    prec = dot_precision()
    part = torch.empty(B, n_split, C, C, **f32)
    psum = torch.empty(B, n_split, C, **f32)
    shift = torch.empty(B, C, **f32)
    _cov_partial_kernel[(nt, nt, B * n_split)](
        a, part, psum, shift, N, C, n_split, rows, *a.stride(),
        BLOCK_C=bc, BLOCK_N=bn, SHIFT_ROWS=min(SHIFT_ROWS, triton.next_power_of_2(N)),
        HALF_DOT=half_dot(a.dtype, prec), PREC=prec)
    S = torch.empty(B, C, C, **f32)
    mean = torch.empty(B, C, **f32)
    tr = torch.empty(B, **f32)
    if p1 is not None:
        assert p1.stride(-2) == C and p1.stride(-1) == 1
    # The reduce is memory-bound: smaller tiles than the products' (rc divides bc, so every upper
    # rc-tile lies in an upper bc-tile the partial kernel wrote) give it more programs.
    rc = block(C, gpu=32)
    nr = triton.cdiv(C, rc)
    _cov_reduce_kernel[(nr, nr, B)](part, psum, shift, S, mean, tr, p1 if p1 is not None else S, N, C, n_split,
                                    p1.stride(0) if p1 is not None else 0, HAS_P1=p1 is not None,
                                    BLOCK_C=rc, BLOCK_R=block(C, gpu=1024, interp=1024), num_warps=num_warps(rc * rc))
    return mean, S, tr


# ------------------------------------------------------------------ costs (module docstring)
def _tiles(n: int, blk: int) -> int:
    """n rounded up to whole tiles of blk."""
    return triton.cdiv(n, blk) * blk


def _cov_partial_cost(k: dict, grid: tuple) -> Work:
    a, N, C, n_split, rows, bc = k["a_ptr"], k["N"], k["C"], k["n_split"], k["rows_per_split"], k["BLOCK_C"]
    B = grid[2] // n_split
    nt = grid[0]
    pairs = nt * (nt + 1) // 2  # upper-triangle tiles
    flops = 2.0 * B * _tiles(N, k["BLOCK_N"]) * pairs * bc * bc
    a_bytes = a.numel() * a.element_size()
    # program (i, j), i <= j, reads column tiles i and j of its chunk: tile j once for the programs
    # adjacent along axis 0, tile i once per j: nt (nt + 1) / 2 tile reads, (nt + 1) / 2 chunks' worth
    reads = reread_bytes(a_bytes, (nt + 1) / 2, min(rows, N) * C * a.element_size())
    part = 4.0 * B * n_split * (pairs * bc * bc + C)
    return Work(flops, reads + part + 4.0 * B * C, programs=pairs * B * n_split)


def _cov_reduce_cost(k: dict, grid: tuple) -> Work:
    C, n_split, bc = k["C"], k["n_split"], k["BLOCK_C"]
    B, nt = grid[2], grid[0]
    tri = nt * (nt + 1) // 2 * bc * bc
    mats = 2 if k["HAS_P1"] else 1
    # partial tiles and sums read (the diagonals again per program, from L2), shift read, S (and P_1)
    # both triangles, mean and tr written
    return Work(1.0 * B * n_split * tri + 6.0 * B * tri + 4.0 * B * n_split * C,
                4.0 * B * (n_split * (tri + C) + 2 * C + mats * C * C + 1), programs=nt * (nt + 1) // 2 * B)


COSTS: dict[str, Callable[[dict, tuple], Work]] = {
    "_cov_partial_kernel": _cov_partial_cost,
    "_cov_reduce_kernel": _cov_reduce_cost,
}
