"""Column means, covariance Sigma = Ac^T Ac / (N - 1), trace and S = Sigma / tr (docs/math.md §3).

Design
- Input: the (B, N, C) observation view A of x (A = x for axis=1, A = x^T for axis=0), read through
  its strides in the input dtype (fp32/bf16/fp16) and upcast to fp32 in registers: no transposed copy.
- Shift. Every row is shifted by s = the mean of the first SHIFT_ROWS observations before the
  product, Sigma = ((A-s)^T (A-s) - (1^T (A-s))^T (1^T (A-s)) / N) / (N-1). |mu - s| is a fraction of
  the spread, so the correction is small and does not cancel the way A^T A - N mu mu^T would for a
  large mean. Every program computes s for its columns from the same loads in the same order, so all
  programs agree on it bit for bit.
- Split N. The rows are cut into n_split chunks of at most MAX_SPLIT_ROWS (and enough chunks to
  fill the GPU); `_cov_partial_kernel`, grid (C/BC, C/BC, B * n_split), program (i, j, b, k) with
  i <= j sums chunk k of one upper-triangle tile (about half the FLOPs of a full product) and its
  shifted column sums into fp32 partial buffers. Short sequential sums keep the fp32 error near
  that of a blocked BLAS product instead of growing with N.
- `_cov_reduce_kernel`, grid (C/BC, C/BC, B): sums the partials in chunk order (deterministic),
  applies the correction, stores the tile and its mirror (the diagonal tile once, made exactly
  symmetric), and in the diagonal programs the means s + sum/N and diag(Sigma).
- `_cov_scale_kernel`, grid (C/BC, C/BC, B): tr = sum diag(Sigma) (each program re-sums the C
  diagonal entries: no cross-program reduction), S = Sigma / tr in place (0 where tr == 0:
  constant input), and P_1 = 1.5 I - 0.5 S in closed form.
Launches: 3. FLOPs: ~C^2 N (triangle). Bytes: A read once per tile row/column pair (from L2), plus
n_split * C^2 / 2 fp32 partials written and read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import aligned, block, dot_acc, dot_precision, guarded_inverse, half_dot, num_warps, small_blocks, strides

# Longest run of rows one program sums sequentially (the fp32 error grows with it).
MAX_SPLIT_ROWS = 2048
# Observations averaged for the shift.
SHIFT_ROWS = 64
# The partial tiles may take at most this many bytes (splits are reduced to fit).
MAX_PARTIAL_BYTES = 256 * 2**20


@triton.jit
def _shift(p_a, o_c, m_c, N, s_an, s_ac, SHIFT_ROWS: tl.constexpr):
    """Mean of the first min(N, SHIFT_ROWS) rows of the columns o_c, fp32."""
    o_n = tl.arange(0, SHIFT_ROWS)
    m = (o_n < N)[:, None] & m_c[None, :]
    b_a = tl.load(p_a + o_n[:, None] * s_an + o_c[None, :] * s_ac, mask=m, other=0.0).to(tl.float32)
    return tl.sum(b_a, axis=0) / tl.minimum(N, SHIFT_ROWS)


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
        o_i = i_i * BLOCK_C + tl.arange(0, BLOCK_C)
        o_j = i_j * BLOCK_C + tl.arange(0, BLOCK_C)
        m_i, m_j = o_i < C, o_j < C
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
def _cov_reduce_kernel(
    part_ptr, psum_ptr, shift_ptr,  # as written by _cov_partial_kernel
    sig_ptr,  # Sigma (B, C, C) fp32, contiguous, written
    mean_ptr,  # column means (B, C) fp32, written by the diagonal programs
    var_ptr,  # diag(Sigma) (B, C) fp32, written by the diagonal programs
    N, C, n_split,
    BLOCK_C: tl.constexpr,
):
    i_i, i_j, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    if i_i <= i_j:
        o_i = i_i * BLOCK_C + tl.arange(0, BLOCK_C)
        o_j = i_j * BLOCK_C + tl.arange(0, BLOCK_C)
        m_i, m_j = o_i < C, o_j < C
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
        p_s = sig_ptr + i_b * C * C
        if i_i == i_j:
            # one store of an exactly symmetric tile: the upper half mirrored
            b_sig = tl.where(o_i[:, None] <= o_j[None, :], b_sig, tl.trans(b_sig))
            tl.store(p_s + o_i[:, None] * C + o_j[None, :], b_sig, mask=m_ij)
            b_diag = tl.sum(tl.where(o_i[:, None] == o_j[None, :], b_sig, 0.0), axis=1)
            tl.store(var_ptr + i_b * C + o_i, b_diag, mask=m_i)
            b_s = tl.load(shift_ptr + i_b * C + o_i, mask=m_i, other=0.0)
            tl.store(mean_ptr + i_b * C + o_i, b_s + b_sum_i / N, mask=m_i)
        else:
            tl.store(p_s + o_i[:, None] * C + o_j[None, :], b_sig, mask=m_ij)
            tl.store(p_s + o_j[None, :] * C + o_i[:, None], b_sig, mask=m_ij)  # mirror: S[j, i] = S[i, j]


@triton.jit
def _cov_scale_kernel(
    sig_ptr,  # Sigma (B, C, C) fp32, contiguous: overwritten with S = Sigma / tr
    var_ptr,  # diag(Sigma) (B, C) fp32
    tr_ptr,  # tr (B,) fp32, written
    p1_ptr,  # P_1 (B, C, C) fp32 with batch stride s_pb, row stride C (if HAS_P1)
    C, s_pb,
    HAS_P1: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i_i, i_j, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    b_tr = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_R):
        o_c = c0 + tl.arange(0, BLOCK_R)
        b_tr += tl.load(var_ptr + i_b * C + o_c, mask=o_c < C, other=0.0)
    tr = tl.sum(b_tr, axis=0)
    inv_tr = guarded_inverse(tr)
    if (i_i == 0) & (i_j == 0):
        tl.store(tr_ptr + i_b, tr)
    o_i = i_i * BLOCK_C + tl.arange(0, BLOCK_C)
    o_j = i_j * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ij = (o_i < C)[:, None] & (o_j < C)[None, :]
    p_s = sig_ptr + i_b * C * C + o_i[:, None] * C + o_j[None, :]
    b_s = tl.load(p_s, mask=m_ij, other=0.0) * inv_tr
    tl.store(p_s, b_s, mask=m_ij)
    if HAS_P1:
        b_p = tl.where(o_i[:, None] == o_j[None, :], 1.5, 0.0) - 0.5 * b_s
        tl.store(p1_ptr + i_b * s_pb + o_i[:, None] * C + o_j[None, :], b_p, mask=m_ij)


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU (2 per SM); 1 under the interpreter (programs run one by one)."""
    if small_blocks() or device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def split_rows(N: int, C: int, B: int, bn: int, bc: int, device: torch.device) -> tuple[int, int]:
    """(n_split, rows_per_split): chunks of at most MAX_SPLIT_ROWS rows (a multiple of bn), and enough
    of them that the triangle tiles times the chunks fill the GPU; partials within MAX_PARTIAL_BYTES."""
    nt = triton.cdiv(C, bc)
    tiles = nt * (nt + 1) // 2 * B
    n_split = max(triton.cdiv(N, MAX_SPLIT_ROWS), triton.cdiv(_target_programs(device), tiles))
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
        HALF_DOT=half_dot(a.dtype, prec), PREC=prec,
        num_warps=num_warps(bc * bc, prec, aligned(N, C, *strides(a))))
    S = torch.empty(B, C, C, **f32)
    mean = torch.empty(B, C, **f32)
    var = torch.empty(B, C, **f32)
    _cov_reduce_kernel[(nt, nt, B)](part, psum, shift, S, mean, var, N, C, n_split,
                                    BLOCK_C=bc, num_warps=num_warps(bc * bc))
    del part, psum
    tr = torch.empty(B, **f32)
    if p1 is not None:
        assert p1.stride(-2) == C and p1.stride(-1) == 1
    _cov_scale_kernel[(nt, nt, B)](S, var, tr, p1 if p1 is not None else S, C,
                                   p1.stride(0) if p1 is not None else 0, HAS_P1=p1 is not None,
                                   BLOCK_C=bc, BLOCK_R=block(C, gpu=1024, interp=1024))
    return mean, S, tr
