"""Column means, covariance Sigma = Ac^T Ac / (N - 1), trace and S = Sigma / tr (SPEC section 3).

Design
- Input: the (B, N, C) observation view A of x (A = x for axis=1, A = x^T for axis=0), read through
  its strides in the input dtype (fp32/bf16/fp16) and upcast to fp32 in registers: no transposed copy.
- `_cov_fwd_kernel`, grid (C/BC, C/BC, B): program (i, j) with i <= j computes one tile of the upper
  triangle and stores it and its mirror (about half the FLOPs of a full product: C^2 N of the
  2 C^2 N). Robust to a large mean: every row is shifted by the first observation s = A[0] before
  the product, Sigma = ((A-s)^T (A-s) - N (mu-s)(mu-s)^T) / (N-1); |mu - s| is of the order of the
  spread, so the correction does not cancel catastrophically the way A^T A - N mu mu^T would.
  Each program sums its own shifted columns, so the means need no second pass; the diagonal
  programs write the means and diag(Sigma).
- `_cov_scale_kernel`, grid (C/BC, C/BC, B): tr = sum diag(Sigma) (each program re-sums the C
  diagonal entries: no cross-program reduction), S = Sigma / tr in place (0 where tr == 0:
  constant input), and P_1 = 1.5 I - 0.5 S in closed form.
Launches: 2. FLOPs: ~C^2 N (triangle). Bytes: A read once per tile row/column pair (from L2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, dot_precision, num_warps


@triton.jit
def _cov_fwd_kernel(
    a_ptr,  # A (B, N, C), input dtype, strides (s_ab, s_an, s_ac)
    sig_ptr,  # Sigma (B, C, C) fp32, contiguous
    mean_ptr,  # column means (B, C) fp32, contiguous
    var_ptr,  # diag(Sigma) (B, C) fp32, contiguous
    N, C, s_ab, s_an, s_ac,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    i_i, i_j, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    if i_i <= i_j:  # upper triangle of tiles only; the mirror is stored below
        o_i = i_i * BLOCK_C + tl.arange(0, BLOCK_C)
        o_j = i_j * BLOCK_C + tl.arange(0, BLOCK_C)
        m_i, m_j = o_i < C, o_j < C
        p_a = a_ptr + i_b * s_ab
        # the shift: first observation of each column
        b_si = tl.load(p_a + o_i * s_ac, mask=m_i, other=0.0).to(tl.float32)
        b_sj = tl.load(p_a + o_j * s_ac, mask=m_j, other=0.0).to(tl.float32)
        b_acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
        b_sum_i = tl.zeros((BLOCK_C,), dtype=tl.float32)
        b_sum_j = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            o_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            m_n = o_n < N
            m_ni = m_n[:, None] & m_i[None, :]
            m_nj = m_n[:, None] & m_j[None, :]
            b_ai = tl.load(p_a + o_n[:, None] * s_an + o_i[None, :] * s_ac, mask=m_ni, other=0.0).to(tl.float32)
            b_aj = tl.load(p_a + o_n[:, None] * s_an + o_j[None, :] * s_ac, mask=m_nj, other=0.0).to(tl.float32)
            b_ai = tl.where(m_ni, b_ai - b_si[None, :], 0.0)
            b_aj = tl.where(m_nj, b_aj - b_sj[None, :], 0.0)
            b_acc = tl.dot(tl.trans(b_ai), b_aj, b_acc, input_precision=PREC)
            b_sum_i += tl.sum(b_ai, axis=0)
            b_sum_j += tl.sum(b_aj, axis=0)
        b_sig = (b_acc - b_sum_i[:, None] * (b_sum_j[None, :] / N)) / (N - 1)
        p_s = sig_ptr + i_b * C * C
        m_ij = m_i[:, None] & m_j[None, :]
        tl.store(p_s + o_i[:, None] * C + o_j[None, :], b_sig, mask=m_ij)
        tl.store(p_s + o_j[None, :] * C + o_i[:, None], b_sig, mask=m_ij)  # mirror: S[j, i] = S[i, j]
        if i_i == i_j:
            b_diag = tl.sum(tl.where(o_i[:, None] == o_j[None, :], b_sig, 0.0), axis=1)
            tl.store(var_ptr + i_b * C + o_i, b_diag, mask=m_i)
            tl.store(mean_ptr + i_b * C + o_i, b_si + b_sum_i / N, mask=m_i)


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
    inv_tr = tl.where(tr > 0, 1.0 / tl.where(tr > 0, tr, 1.0), 0.0)
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


def covariance_fwd(a: torch.Tensor, p1: torch.Tensor | None = None):
    """a: the (B, N, C) observation view (any strides). Returns (mean (B,C), S (B,C,C), tr (B,)) in fp32;
    writes P_1 = 1.5 I - 0.5 S into `p1` (a (B, C, C) view with row stride C, unit column stride) if given."""
    B, N, C = a.shape
    f32 = dict(device=a.device, dtype=torch.float32)
    S = torch.empty(B, C, C, **f32)
    mean = torch.empty(B, C, **f32)
    var = torch.empty(B, C, **f32)
    tr = torch.empty(B, **f32)
    bc = block(C, gpu=64)
    bn = block(N, gpu=32)
    nt = triton.cdiv(C, bc)
    _cov_fwd_kernel[(nt, nt, B)](a, S, mean, var, N, C, *a.stride(), BLOCK_C=bc, BLOCK_N=bn,
                                 PREC=dot_precision(), num_warps=num_warps(bc * bc))
    if p1 is not None:
        assert p1.stride(-2) == C and p1.stride(-1) == 1
    _cov_scale_kernel[(nt, nt, B)](S, var, tr, p1 if p1 is not None else S, C,
                                   p1.stride(0) if p1 is not None else 0, HAS_P1=p1 is not None,
                                   BLOCK_C=bc, BLOCK_R=block(C, gpu=1024, interp=1024))
    return mean, S, tr
