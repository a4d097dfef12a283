"""Newton-Schulz iterations of IterNorm, forward and backward (SPEC sections 3 and 5).

All matrices here are (B, C, C) fp32, row-major (row stride C, unit column stride), batch strides
passed explicitly, so slices of the saved Ps (B, T, C, C) and Pp (B, T-1, 2, C, C) are used in place.

Design
- One product kernel, `_ns_mm_kernel`: O = alpha * (X1 Y1 [+ X2 Y2 [+ X3 Y3]]) + beta * Z, grid
  (C/BM, C/BN, B). With SYM it computes only the tiles i <= j of a result known to be symmetric
  and stores each with its mirror (every iterate P_k and its powers are polynomials in S).
- Forward, step k = 2..T (P_1 comes in closed form from the covariance kernels):
      P^2 = P P (SYM), P^3 = P^2 P (SYM), P_k = 1.5 P - 0.5 P^3 S (SYM, the update in the epilogue)
  3 launches per step, 3 (T-1) C^3 FLOPs of multiply-add (the triangle of 3 products of 2 C^3).
  P^2 and P^3 are written straight into Pp, P_k into Ps: the saved layout costs no copy.
  For small C (the axis=0 default C = 256, 2 views batched) one launch per step computes the
  three products of a block of rows (`_ns_step_rows_kernel`): row block r of P^2 needs only rows r
  of P, and so on down the chain, so no program waits for another.
- Backward, step k = T..2 with B = P_{k-1} (symmetric, commuting with S), G = Pbar:
      Sbar -= 0.5 B^3 G;   H = G S;   U = B H;   G <- 1.5 G - 0.5 (H B^2 + U B + B^2 H)
  4 launches per step (the last one sums its three products in one accumulator), 6 C^3 products
  of 2 C^3 FLOPs each; then Sbar -= 0.5 G for k = 1 (B = I).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block, dot_precision, interpreting, num_warps


@triton.jit
def _mm_acc(acc, x_ptr, y_ptr, o_m, o_n, C, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """acc += X[o_m, :] @ Y[:, o_n] for row-major (C, C) X, Y."""
    m_m, m_n = o_m < C, o_n < C
    for k0 in range(0, C, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        b_x = tl.load(x_ptr + o_m[:, None] * C + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_y = tl.load(y_ptr + o_k[:, None] * C + o_n[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0)
        acc = tl.dot(b_x, b_y, acc, input_precision=PREC)
    return acc


@triton.jit
def _ns_mm_kernel(
    o_ptr, z_ptr,  # O (B, C, C) written; Z (B, C, C) read in the epilogue (HAS_Z); may alias O
    x1_ptr, y1_ptr, x2_ptr, y2_ptr, x3_ptr, y3_ptr,  # the factors (B, C, C); must not alias O
    C, s_ob, s_zb, s_x1b, s_y1b, s_x2b, s_y2b, s_x3b, s_y3b,  # batch strides
    alpha, beta,
    NPROD: tl.constexpr, HAS_Z: tl.constexpr, SYM: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    i_m, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    if (not SYM) or (i_m <= i_n):
        o_m = i_m * BLOCK + tl.arange(0, BLOCK)
        o_n = i_n * BLOCK + tl.arange(0, BLOCK)
        b_acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        b_acc = _mm_acc(b_acc, x1_ptr + i_b * s_x1b, y1_ptr + i_b * s_y1b, o_m, o_n, C, BLOCK_K, PREC)
        if NPROD >= 2:
            b_acc = _mm_acc(b_acc, x2_ptr + i_b * s_x2b, y2_ptr + i_b * s_y2b, o_m, o_n, C, BLOCK_K, PREC)
        if NPROD >= 3:
            b_acc = _mm_acc(b_acc, x3_ptr + i_b * s_x3b, y3_ptr + i_b * s_y3b, o_m, o_n, C, BLOCK_K, PREC)
        m_mn = (o_m < C)[:, None] & (o_n < C)[None, :]
        b_o = alpha * b_acc
        if HAS_Z:
            b_o += beta * tl.load(z_ptr + i_b * s_zb + o_m[:, None] * C + o_n[None, :], mask=m_mn, other=0.0)
        p_o = o_ptr + i_b * s_ob
        tl.store(p_o + o_m[:, None] * C + o_n[None, :], b_o, mask=m_mn)
        if SYM:
            if i_m != i_n:
                tl.store(p_o + o_n[None, :] * C + o_m[:, None], b_o, mask=m_mn)  # mirror tile


def _check_square(t: torch.Tensor, C: int) -> None:
    assert t.dtype == torch.float32 and t.shape[-2:] == (C, C) and t.stride(-2) == C and t.stride(-1) == 1, \
        (t.shape, t.stride(), t.dtype)


def ns_mm(out, prods, alpha=1.0, z=None, beta=0.0, sym=False):
    """out = alpha * sum_p X_p @ Y_p + beta * z over (B, C, C) fp32 row-major matrices (1-3 products)."""
    B, C = out.shape[0], out.shape[-1]
    mats = [out] + [t for p in prods for t in p] + ([z] if z is not None else [])
    for t in mats:
        _check_square(t, C)
    flat = [t for p in prods for t in p]
    flat += [flat[0]] * (6 - len(flat))  # unused slots: any valid pointer
    bs = block(C, gpu=64)
    bk = block(C, gpu=32)
    nt = triton.cdiv(C, bs)
    zz = z if z is not None else out
    _ns_mm_kernel[(nt, nt, B)](
        out, zz, *flat, C, out.stride(0), zz.stride(0), *[t.stride(0) for t in flat],
        float(alpha), float(beta), NPROD=len(prods), HAS_Z=z is not None, SYM=sym,
        BLOCK=bs, BLOCK_K=bk, PREC=dot_precision(), num_warps=num_warps(bs * bs))
    return out


def newton_schulz_fwd(S: torch.Tensor, Ps: torch.Tensor, Pp: torch.Tensor) -> None:
    """Fill Ps[:, 1:] (P_2..P_T) and Pp (P_k^2, P_k^3, k = 1..T-1) in place; Ps[:, 0] = P_1 is given."""
    T = Ps.shape[1]
    for k in range(1, T):
        P, P2, P3 = Ps[:, k - 1], Pp[:, k - 1, 0], Pp[:, k - 1, 1]
        ns_mm(P2, [(P, P)], sym=True)
        ns_mm(P3, [(P2, P)], sym=True)
        ns_mm(Ps[:, k], [(P3, S)], alpha=-0.5, z=P, beta=1.5, sym=True)


def newton_schulz_bwd(G: torch.Tensor, S: torch.Tensor, Ps: torch.Tensor, Pp: torch.Tensor) -> torch.Tensor:
    """Sbar (B, C, C) given G = dL/dP_T (B, C, C), through the T Newton-Schulz steps. G is overwritten."""
    T = Ps.shape[1]
    Sbar = torch.zeros_like(S)
    if T == 0:
        return Sbar
    H, U, G2 = torch.empty_like(G), torch.empty_like(G), torch.empty_like(G)
    for k in range(T, 1, -1):
        B, B2, B3 = Ps[:, k - 2], Pp[:, k - 2, 0], Pp[:, k - 2, 1]
        ns_mm(Sbar, [(B3, G)], alpha=-0.5, z=Sbar, beta=1.0)
        ns_mm(H, [(G, S)])
        ns_mm(U, [(B, H)])
        ns_mm(G2, [(H, B2), (U, B), (B2, H)], alpha=-0.5, z=G, beta=1.5)
        G, G2 = G2, G
    Sbar.add_(G, alpha=-0.5)  # k = 1: B = P_0 = I
    return Sbar
