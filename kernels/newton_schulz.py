"""Newton-Schulz iterations of IterNorm, forward and backward (docs/math.md §3 and §5).

All matrices here are (B, C, C) fp32, row-major (row stride C, unit column stride), batch strides
passed explicitly, so slices of the saved Ps (B, T, C, C) and powers (B, T-1, 2, C, C) are used in place.

Design
- One product kernel, `_ns_mm_kernel`: O = alpha * (X1 Y1 [+ X2 Y2 [+ X3 Y3]]) + beta * Z, grid
  (C/BM, C/BN, B). With SYM it computes only the tiles i <= j of a result known to be symmetric
  and stores each with its mirror (every iterate P_k and its powers are polynomials in S).
- Forward, step k = 2..T (P_1 comes in closed form from the covariance kernels):
      P^2 = P P (SYM), P^3 = P^2 P (SYM), P_k = 1.5 P - 0.5 P^3 S (SYM, the update in the epilogue)
  Large C (> ROWS_MAX_C, e.g. axis=1 with d = 4096): 3 launches of `_ns_mm_kernel` per step, each
  computing only the upper triangle of tiles: ~3 C^3 FLOPs per step instead of 6 C^3.
  Small C (the axis=0 default C = 256, the views batched in the grid): ONE launch per step,
  `_ns_fwd_rows_kernel`, grid (C/BM, B): row block r of P^2 needs only rows r of P (and all of P),
  row block r of P^3 only rows r of P^2, and so on, so each program runs the whole step for its
  rows without waiting for another (full rows: 6 C^3 FLOPs per step, but T-1 launches in all).
  P^2 and P^3 are written straight into powers, P_k into Ps: the saved layout costs no copy.
- Backward, step k = T..2 with B = P_{k-1} (symmetric, commuting with S), G = Pbar:
      Sbar -= 0.5 B^3 G;   H = G S;   U = B H;   G <- 1.5 G - 0.5 (H B^2 + U B + B^2 H)
  6 products of 2 C^3 FLOPs per step (G is not symmetric: full tiles). Large C: 4 launches per step
  (the last sums its three products in one accumulator). Small C: 2 launches per step,
  `_ns_bwd_rows_a_kernel` (rows of Sbar and H, which need all of G) then `_ns_bwd_rows_b_kernel`
  (rows of U = B H, then rows of the new G, which need all of H). Then Sbar -= 0.5 G for k = 1 (B = I).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import aligned, block, dot_precision, num_warps, small_blocks


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


@triton.jit
def _rows_mm(o_ptr, z_ptr, x1_ptr, y1_ptr, x2_ptr, y2_ptr, x3_ptr, y3_ptr, o_m, C, alpha, beta,
             NPROD: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """O[o_m, :] = alpha * sum_p X_p[o_m, :] @ Y_p + beta * Z[o_m, :] for one block of rows, all columns
    (pointers already offset to this batch entry; row-major (C, C))."""
    m_m = o_m < C
    for n0 in range(0, C, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_acc = _mm_acc(b_acc, x1_ptr, y1_ptr, o_m, o_n, C, BLOCK_K, PREC)
        if NPROD >= 2:
            b_acc = _mm_acc(b_acc, x2_ptr, y2_ptr, o_m, o_n, C, BLOCK_K, PREC)
        if NPROD >= 3:
            b_acc = _mm_acc(b_acc, x3_ptr, y3_ptr, o_m, o_n, C, BLOCK_K, PREC)
        m_mn = m_m[:, None] & (o_n < C)[None, :]
        o_mn = o_m[:, None] * C + o_n[None, :]
        b_o = alpha * b_acc
        if HAS_Z:
            b_o += beta * tl.load(z_ptr + o_mn, mask=m_mn, other=0.0)
        tl.store(o_ptr + o_mn, b_o, mask=m_mn)


@triton.jit
def _ns_fwd_rows_kernel(
    p_ptr, p2_ptr, p3_ptr, pn_ptr,  # P_{k-1} (read), P^2, P^3, P_k (written): (B, C, C), batch strides below
    s_ptr,  # S (B, C, C) contiguous
    C, s_pb, s_p2b, s_p3b, s_pnb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """One whole Newton step for one block of rows: each product's rows need only the same rows of
    the previous product (plus whole operands that are complete), so programs never wait on each other."""
    i_r, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_m = i_r * BLOCK_M + tl.arange(0, BLOCK_M)
    p_p, p_2, p_3 = p_ptr + i_b * s_pb, p2_ptr + i_b * s_p2b, p3_ptr + i_b * s_p3b
    p_n, p_s = pn_ptr + i_b * s_pnb, s_ptr + i_b * C * C
    _rows_mm(p_2, p_2, p_p, p_p, p_p, p_p, p_p, p_p, o_m, C, 1.0, 0.0, 1, False, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    tl.debug_barrier()  # this program's rows of P^2 are read back by all of its threads
    _rows_mm(p_3, p_3, p_2, p_p, p_p, p_p, p_p, p_p, o_m, C, 1.0, 0.0, 1, False, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    tl.debug_barrier()
    _rows_mm(p_n, p_p, p_3, p_s, p_p, p_p, p_p, p_p, o_m, C, -0.5, 1.5, 1, True, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _ns_bwd_rows_a_kernel(
    sbar_ptr, h_ptr,  # Sbar (B, C, C) updated in place, H (B, C, C) written; contiguous
    g_ptr, s_ptr,  # G, S (B, C, C) contiguous
    b3_ptr,  # B^3 (B, C, C), batch stride s_b3b
    C, s_b3b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """Rows of Sbar -= 0.5 B^3 G and of H = G S."""
    i_r, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_m = i_r * BLOCK_M + tl.arange(0, BLOCK_M)
    cc = i_b * C * C
    p_sb, p_h, p_g, p_s = sbar_ptr + cc, h_ptr + cc, g_ptr + cc, s_ptr + cc
    p_b3 = b3_ptr + i_b * s_b3b
    _rows_mm(p_sb, p_sb, p_b3, p_g, p_g, p_g, p_g, p_g, o_m, C, -0.5, 1.0, 1, True, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    _rows_mm(p_h, p_h, p_g, p_s, p_g, p_g, p_g, p_g, o_m, C, 1.0, 0.0, 1, False, BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _ns_bwd_rows_b_kernel(
    g2_ptr, u_ptr,  # G_new, U = B H (scratch) (B, C, C) contiguous, written
    g_ptr, h_ptr,  # G, H (B, C, C) contiguous
    b_ptr, b2_ptr,  # B, B^2 (B, C, C), batch strides s_bb, s_b2b
    C, s_bb, s_b2b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """Rows of U = B H, then of G_new = 1.5 G - 0.5 (H B^2 + U B + B^2 H)."""
    i_r, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_m = i_r * BLOCK_M + tl.arange(0, BLOCK_M)
    cc = i_b * C * C
    p_g2, p_u, p_g, p_h = g2_ptr + cc, u_ptr + cc, g_ptr + cc, h_ptr + cc
    p_b, p_b2 = b_ptr + i_b * s_bb, b2_ptr + i_b * s_b2b
    _rows_mm(p_u, p_u, p_b, p_h, p_b, p_b, p_b, p_b, o_m, C, 1.0, 0.0, 1, False, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    tl.debug_barrier()  # this program's rows of U are read back
    _rows_mm(p_g2, p_g, p_h, p_b2, p_u, p_b, p_b2, p_h, o_m, C, -0.5, 1.5, 3, True,
             BLOCK_M, BLOCK_N, BLOCK_K, PREC)


# Up to this many variables the Newton steps run as one launch per step over blocks of rows
# (forward) or two (backward); above it as triangle-tiled products (3 resp. 4 launches per step).
ROWS_MAX_C = 512


def _use_rows(C: int) -> bool:
    return C <= ROWS_MAX_C


def _rows_blocks(C: int, prec: str):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the row-block kernels for products at precision prec."""
    if small_blocks():
        return block(C, 0, interp=128), block(C, 0, interp=128), block(C, 0, interp=128), 4
    bm = 16 if C <= 256 else 32
    if bm == 16 and prec == "ieee":  # exact fp32 FMA products spilled with BLOCK_K = 32
        return bm, 64, 16, 4
    # 8 warps where ptxas spilled with 4 (triton 3.8): the 32-row tiles of the backward's three products
    return bm, 64, 32, (8 if bm == 32 else num_warps(bm * 64, prec, aligned(C)))


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
    prec = dot_precision()
    nt = triton.cdiv(C, bs)
    zz = z if z is not None else out
    _ns_mm_kernel[(nt, nt, B)](
        out, zz, *flat, C, out.stride(0), zz.stride(0), *[t.stride(0) for t in flat],
        float(alpha), float(beta), NPROD=len(prods), HAS_Z=z is not None, SYM=sym,
        BLOCK=bs, BLOCK_K=bk, PREC=prec, num_warps=num_warps(bs * bs, prec, aligned(C)))
    return out


def newton_schulz_fwd(S: torch.Tensor, Ps: torch.Tensor, powers: torch.Tensor) -> None:
    """Fill Ps[:, 1:] (P_2..P_T) and powers (P_k^2, P_k^3, k = 1..T-1) in place; Ps[:, 0] = P_1 is given."""
    B, T, C = Ps.shape[0], Ps.shape[1], S.shape[-1]
    prec = dot_precision()
    for k in range(1, T):
        P, P2, P3, Pn = Ps[:, k - 1], powers[:, k - 1, 0], powers[:, k - 1, 1], Ps[:, k]
        if _use_rows(C):
            for t in (S, P, P2, P3, Pn):
                _check_square(t, C)
            bm, bn, bk, nw = _rows_blocks(C, prec)
            _ns_fwd_rows_kernel[(triton.cdiv(C, bm), B)](
                P, P2, P3, Pn, S, C, P.stride(0), P2.stride(0), P3.stride(0), Pn.stride(0),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PREC=prec, num_warps=nw)
        else:
            ns_mm(P2, [(P, P)], sym=True)
            ns_mm(P3, [(P2, P)], sym=True)
            ns_mm(Pn, [(P3, S)], alpha=-0.5, z=P, beta=1.5, sym=True)


def newton_schulz_bwd(G: torch.Tensor, S: torch.Tensor, Ps: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:
    """Sbar (B, C, C) given G = dL/dP_T (B, C, C) contiguous, through the T Newton-Schulz steps.
    G is overwritten."""
    B, T, C = Ps.shape[0], Ps.shape[1], S.shape[-1]
    Sbar = torch.zeros_like(S)
    if T == 0:
        return Sbar
    H, U, G2 = torch.empty_like(G), torch.empty_like(G), torch.empty_like(G)
    prec = dot_precision()
    for k in range(T, 1, -1):
        Bk, B2, B3 = Ps[:, k - 2], powers[:, k - 2, 0], powers[:, k - 2, 1]
        if _use_rows(C):
            for t in (G, S, H, U, G2, Sbar, Bk, B2, B3):
                _check_square(t, C)
            bm, bn, bk, nw = _rows_blocks(C, prec)
            grid = (triton.cdiv(C, bm), B)
            _ns_bwd_rows_a_kernel[grid](Sbar, H, G, S, B3, C, B3.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                                        BLOCK_K=bk, PREC=prec, num_warps=nw)
            _ns_bwd_rows_b_kernel[grid](G2, U, G, H, Bk, B2, C, Bk.stride(0), B2.stride(0), BLOCK_M=bm,
                                        BLOCK_N=bn, BLOCK_K=bk, PREC=prec, num_warps=nw)
        else:
            ns_mm(Sbar, [(B3, G)], alpha=-0.5, z=Sbar, beta=1.0)
            ns_mm(H, [(G, S)])
            ns_mm(U, [(Bk, H)])
            ns_mm(G2, [(H, B2), (U, Bk), (B2, H)], alpha=-0.5, z=G, beta=1.5)
        G, G2 = G2, G
    Sbar.add_(G, alpha=-0.5)  # k = 1: B = P_0 = I
    return Sbar
