"""Newton-Schulz iterations of IterNorm, forward and backward (docs/math.md §3 and §5).

All matrices here are (B, C, C) fp32, row-major (row stride C, unit column stride), batch strides
passed explicitly, so slices of the saved Ps (B, T, C, C) and powers (B, T-1, 2, C, C) are used in place.

Design
- One product kernel, `_ns_mm_kernel`: O = alpha * (X1 Y1 [+ X2 Y2 [+ X3 Y3]]) + beta * Z, grid
  (C/BLOCK, C/BLOCK, B), 64 x 64 tiles (128 x 128 for large C, see LARGE_TILE_MIN_C). With SYM it
  computes only the tiles i <= j of a result known to be symmetric and stores each with its mirror
  (every iterate P_k and its powers are polynomials in S).
- Forward, step k = 2..T (P_1 comes in closed form from the covariance kernels):
      P^2 = P P (SYM), P^3 = P^2 P (SYM), P_k = 1.5 P - 0.5 P^3 S (SYM, the update in the epilogue)
  Large C (> ROWS_MAX_C, e.g. axis=1 with d = 4096): 3 launches of `_ns_mm_kernel` per step, each
  computing only the upper triangle of tiles: ~3 C^3 FLOPs per step instead of 6 C^3.
  Small C (the axis=0 default C = 256, the views batched in the grid): ONE launch per step,
  `_ns_fwd_rows_kernel`, grid (C/BLOCK_M, B): row block r of P^2 needs only rows r of P (and all of P),
  row block r of P^3 only rows r of P^2, and so on, so each program runs the whole step for its
  rows without waiting for another (full rows: 6 C^3 FLOPs per step, but T-1 launches in all).
  P^2 and P^3 are written straight into powers, P_k into Ps: the saved layout costs no copy.
  Column groups (`_col_groups`): C/BLOCK_M row blocks x B views leave most SMs idle at C = 256 (32 of
  132 for 2 views), so each row block is split over up to MAX_COL_GROUPS programs, grid
  (C/BLOCK_M, groups, B): each group computes the rows of P^2 and P^3 in full (group 0 into powers,
  the others into scratch) and only its columns of P_k: ~2.25 instead of 3 row-block products per
  program and 4x the programs. The backward's kernels split the same way.
- Backward, step k = T..2 with B = P_{k-1} (symmetric, commuting with S), G = Pbar:
      Sbar -= 0.5 B^3 G;   H = G S;   U = B H;   G <- 1.5 G - 0.5 (H B^2 + U B + B^2 H)
  6 products of 2 C^3 FLOPs per step (G is not symmetric: full tiles). Large C: 4 launches per step
  (the last sums its three products in one accumulator). Small C: 2 launches per step,
  `_ns_bwd_rows_a_kernel` (rows of Sbar and H, which need all of G: the column groups split them
  exactly) then `_ns_bwd_rows_b_kernel` (rows of U = B H, which each column group computes in full,
  then its columns of the new G, which need all of H). The first step writes Sbar (no
  zero fill); k = 1 (B = I) adds Sbar -= 0.5 G and each row block's part of <Sbar, S> (the covariance
  backward's one C x C reduction, summed by its consumer): in the last `_ns_bwd_rows_b_kernel`
  (small C) or in one `_ns_bwd_finish_kernel` launch (large C, and T = 1).
- Autotuned on the GPU (_common.autotune): the K step, the column block and the warps; the kernels
  that update Sbar or O in place restore them between timing runs.
Launches: forward T-1 (small C) or 3 (T-1); backward 2 (T-1) (small C) or 4 (T-1) + 1; T = 1: 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Work, aligned, autotune, block, dot_precision, sm_count, small_blocks, tuned_kwargs

# Tuned parameters (grid-independent; see _common.autotune; under the interpreter the launchers pass
# them). Row-block kernels: the column block of the outputs and the K step; `_ns_mm_kernel`: the K step. Configs that spilled registers with ptxas
# for sm_90 (bench/aot_compile.py, triton 3.6) are pruned: exact fp32 ("ieee") products hold their
# operand tiles in registers, 32-row blocks and unaligned sizes want 8 warps.
_ROWS_CONFIGS = {
    "64x32w4": triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    "64x32w8": triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    "128x32w8": triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    "64x16w4": triton.Config({"BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    "64x16w8": triton.Config({"BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
}


def _prune_rows(configs, named_args, **kwargs):
    keep = _prune_rows_spills(named_args, **kwargs)
    narrow = [c for c in keep if c.kwargs["BLOCK_N"] <= max(64, named_args["CW"])]  # column groups of 64
    return narrow or keep


def _prune_rows_spills(named_args, **kwargs):
    c = _ROWS_CONFIGS
    if kwargs["PREC"] == "ieee":
        return [c["64x16w4"]] if kwargs["BLOCK_M"] == 16 else [c["64x32w8"]]
    if not aligned(named_args["C"]):  # 128-column blocks spilled
        return [c["64x32w8"]]
    if kwargs["BLOCK_M"] == 16:
        return [c["64x32w4"], c["64x32w8"], c["128x32w8"]]
    if kwargs["PREC"] == "tf32x3":  # 32 rows x a K step of 32 spilled (the split operands of three MMAs)
        return [c["64x16w8"], c["128x32w8"]]
    return [c["64x32w8"], c["128x32w8"]]


_MM_CONFIGS = {
    "k32w4": triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=3),
    "k32w8": triton.Config({"BLOCK_K": 32}, num_warps=8, num_stages=3),
    "k64w8": triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
    "k16w8": triton.Config({"BLOCK_K": 16}, num_warps=8, num_stages=3),
}


def _prune_mm(configs, named_args, **kwargs):
    c = _MM_CONFIGS
    if kwargs["PREC"] == "ieee":
        return [c["k16w8"]]
    # tf32x3 splits each operand tile in two: a K step of 64 spilled with three products
    wide = [c["k64w8"]] if kwargs["PREC"] != "tf32x3" else []
    if kwargs["BLOCK"] >= 128 or not aligned(named_args["C"]):
        return [c["k32w8"], *wide]
    return [c["k32w4"], c["k32w8"], *wide]


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


@autotune(list(_MM_CONFIGS.values()), key=["C", "NPROD", "HAS_Z", "SYM", "BLOCK", "PREC"],
          prune=_prune_mm, restore_value=["o_ptr"])  # O may be Z (updated in place)
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
def _rows_mm(o_ptr, z_ptr, x1_ptr, y1_ptr, x2_ptr, y2_ptr, x3_ptr, y3_ptr, o_m, n_lo, n_hi, C, alpha, beta,
             NPROD: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    """O[o_m, n_lo:n_hi] = alpha * sum_p X_p[o_m, :] @ Y_p[:, n_lo:n_hi] + beta * Z[o_m, n_lo:n_hi] for
    one block of rows and a range of columns (pointers already offset to this batch entry; row-major
    (C, C))."""
    m_m = o_m < C
    for n0 in range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_acc = _mm_acc(b_acc, x1_ptr, y1_ptr, o_m, o_n, C, BLOCK_K, PREC)
        if NPROD >= 2:
            b_acc = _mm_acc(b_acc, x2_ptr, y2_ptr, o_m, o_n, C, BLOCK_K, PREC)
        if NPROD >= 3:
            b_acc = _mm_acc(b_acc, x3_ptr, y3_ptr, o_m, o_n, C, BLOCK_K, PREC)
        m_mn = m_m[:, None] & (o_n < n_hi)[None, :]
        o_mn = o_m[:, None] * C + o_n[None, :]
        b_o = alpha * b_acc
        if HAS_Z:
            b_o += beta * tl.load(z_ptr + o_mn, mask=m_mn, other=0.0)
        tl.store(o_ptr + o_mn, b_o, mask=m_mn)


@triton.jit
def _row_col_block(C, CW, BLOCK_M: tl.constexpr):
    """(i_r, i_h, i_b, o_m, n_lo, n_hi) of a program on grid (C/BLOCK_M, column groups, B): row block
    i_r, column group i_h (columns n_lo:n_hi, CW wide), view i_b."""
    i_r, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n_lo = i_h * CW
    return i_r, i_h, i_b, i_r * BLOCK_M + tl.arange(0, BLOCK_M), n_lo, tl.minimum(C, n_lo + CW)


@autotune(list(_ROWS_CONFIGS.values()), key=["C", "CW", "BLOCK_M", "PREC"], prune=_prune_rows)
@triton.jit
def _ns_fwd_rows_kernel(
    p_ptr, p2_ptr, p3_ptr, pn_ptr,  # P_{k-1} (read), P^2, P^3, P_k (written): (B, C, C), batch strides below
    s_ptr,  # S (B, C, C) contiguous
    scr_ptr,  # (groups - 1, B, 2, C, C) fp32: the other column groups' copies of P^2, P^3 rows
    C, CW, s_pb, s_p2b, s_p3b, s_pnb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """One whole Newton step for one block of rows: each product's rows need only the same rows of
    the previous product (plus whole operands that are complete), so programs never wait on each other.
    Column group i_h computes the rows of P^2 and P^3 in full (group 0 into the saved powers, the
    others into scratch: no two programs write one element) and its columns of P_k."""
    i_r, i_h, i_b, o_m, n_lo, n_hi = _row_col_block(C, CW, BLOCK_M)
    p_p, p_n, p_s = p_ptr + i_b * s_pb, pn_ptr + i_b * s_pnb, s_ptr + i_b * C * C
    if i_h == 0:
        p_2, p_3 = p2_ptr + i_b * s_p2b, p3_ptr + i_b * s_p3b
    else:
        p_2 = scr_ptr + ((i_h - 1) * tl.num_programs(2) + i_b) * 2 * C * C
        p_3 = p_2 + C * C
    _rows_mm(p_2, p_2, p_p, p_p, p_p, p_p, p_p, p_p, o_m, 0, C, C, 1.0, 0.0, 1, False,
             BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    tl.debug_barrier()  # this program's rows of P^2 are read back by all of its threads
    _rows_mm(p_3, p_3, p_2, p_p, p_p, p_p, p_p, p_p, o_m, 0, C, C, 1.0, 0.0, 1, False,
             BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    tl.debug_barrier()
    _rows_mm(p_n, p_p, p_3, p_s, p_p, p_p, p_p, p_p, o_m, n_lo, n_hi, C, -0.5, 1.5, 1, True,
             BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@autotune(list(_ROWS_CONFIGS.values()), key=["C", "CW", "BLOCK_M", "PREC"], prune=_prune_rows,
          restore_value=["sbar_ptr"])  # Sbar is updated in place
@triton.jit
def _ns_bwd_rows_a_kernel(
    sbar_ptr, h_ptr,  # Sbar (B, C, C) updated in place (written when FIRST), H (B, C, C) written; contiguous
    g_ptr, s_ptr,  # G, S (B, C, C) contiguous
    b3_ptr,  # B^3 (B, C, C), batch stride s_b3b
    C, CW, s_b3b,
    FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """Rows x columns n_lo:n_hi of Sbar -= 0.5 B^3 G (Sbar = -0.5 B^3 G at the first step: no zero fill)
    and of H = G S: both need only complete operands, so the column groups split them exactly."""
    i_r, i_h, i_b, o_m, n_lo, n_hi = _row_col_block(C, CW, BLOCK_M)
    cc = i_b * C * C
    p_sb, p_h, p_g, p_s = sbar_ptr + cc, h_ptr + cc, g_ptr + cc, s_ptr + cc
    p_b3 = b3_ptr + i_b * s_b3b
    _rows_mm(p_sb, p_sb, p_b3, p_g, p_g, p_g, p_g, p_g, o_m, n_lo, n_hi, C, -0.5, 1.0, 1, not FIRST,
             BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    _rows_mm(p_h, p_h, p_g, p_s, p_g, p_g, p_g, p_g, o_m, n_lo, n_hi, C, 1.0, 0.0, 1, False,
             BLOCK_M, BLOCK_N, BLOCK_K, PREC)


@triton.jit
def _sbar_finish_rows(p_sb, p_g, p_s, o_m, n_lo, n_hi, C, HAS_SBAR: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Rows o_m x columns n_lo:n_hi of Sbar += -0.5 G (the last step, B = P_0 = I; Sbar = -0.5 G without
    HAS_SBAR), and their part of <Sbar, S> (fp32 scalar). Pointers already offset to this batch entry."""
    m_m = o_m < C
    b_ss = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_mn = m_m[:, None] & (o_n < n_hi)[None, :]
        o_mn = o_m[:, None] * C + o_n[None, :]
        b_sb = -0.5 * tl.load(p_g + o_mn, mask=m_mn, other=0.0)
        if HAS_SBAR:
            b_sb += tl.load(p_sb + o_mn, mask=m_mn, other=0.0)
        tl.store(p_sb + o_mn, b_sb, mask=m_mn)
        b_ss += b_sb * tl.load(p_s + o_mn, mask=m_mn, other=0.0)
    return tl.sum(tl.sum(b_ss, axis=1), axis=0)


@triton.jit
def _ns_bwd_finish_kernel(
    sbar_ptr, g_ptr, s_ptr,  # (B, C, C) contiguous: Sbar (updated in place, or written without HAS_SBAR), G, S
    ss_ptr,  # (B, C/BLOCK_M) fp32: each program's part of <Sbar, S>, written
    C,
    HAS_SBAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sbar += -0.5 G and <Sbar, S> by row blocks, grid (C/BLOCK_M, B): the large-C path's last step
    (the row-block path does this in `_ns_bwd_rows_b_kernel`), and T = 1 (Sbar = -0.5 G)."""
    i_r, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_m = i_r * BLOCK_M + tl.arange(0, BLOCK_M)
    cc = i_b * C * C
    ss = _sbar_finish_rows(sbar_ptr + cc, g_ptr + cc, s_ptr + cc, o_m, 0, C, C, HAS_SBAR, BLOCK_M, BLOCK_N)
    tl.store(ss_ptr + i_b * tl.num_programs(0) + i_r, ss)


@autotune(list(_ROWS_CONFIGS.values()), key=["C", "CW", "BLOCK_M", "PREC"], prune=_prune_rows,
          restore_value=["sbar_ptr"])  # at the last step Sbar is updated in place
@triton.jit
def _ns_bwd_rows_b_kernel(
    g2_ptr,  # G_new (B, C, C) contiguous, written
    u_ptr,  # U = B H, each column group's own copy of its rows (groups, B, C, C) scratch, written
    g_ptr, h_ptr,  # G, H (B, C, C) contiguous
    b_ptr, b2_ptr,  # B, B^2 (B, C, C), batch strides s_bb, s_b2b
    sbar_ptr, s_ptr,  # Sbar, S (B, C, C) contiguous (LAST: Sbar += -0.5 G_new in place)
    ss_ptr,  # (B, C/BLOCK_M * groups) fp32 (LAST: each program's part of <Sbar, S>, written)
    C, CW, s_bb, s_b2b,
    LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """Rows of U = B H in full (each column group its own copy), then rows x columns n_lo:n_hi of
    G_new = 1.5 G - 0.5 (H B^2 + U B + B^2 H); at the last step (k = 2) also the k = 1 term
    Sbar += -0.5 G_new (B = P_0 = I) and the block's part of <Sbar, S>."""
    i_r, i_h, i_b, o_m, n_lo, n_hi = _row_col_block(C, CW, BLOCK_M)
    cc = i_b * C * C
    p_g2, p_g, p_h = g2_ptr + cc, g_ptr + cc, h_ptr + cc
    p_u = u_ptr + (i_h * tl.num_programs(2) + i_b) * C * C
    p_b, p_b2 = b_ptr + i_b * s_bb, b2_ptr + i_b * s_b2b
    _rows_mm(p_u, p_u, p_b, p_h, p_b, p_b, p_b, p_b, o_m, 0, C, C, 1.0, 0.0, 1, False,
             BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    tl.debug_barrier()  # this program's rows of U are read back
    _rows_mm(p_g2, p_g, p_h, p_b2, p_u, p_b, p_b2, p_h, o_m, n_lo, n_hi, C, -0.5, 1.5, 3, True,
             BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    if LAST:
        tl.debug_barrier()  # this program's block of G_new is read back
        ss = _sbar_finish_rows(sbar_ptr + cc, p_g2, s_ptr + cc, o_m, n_lo, n_hi, C, True, BLOCK_M, BLOCK_N)
        tl.store(ss_ptr + i_b * tl.num_programs(0) * tl.num_programs(1) + i_r * tl.num_programs(1) + i_h, ss)


# Up to this many variables the Newton steps run as one launch per step over blocks of rows
# (forward) or two (backward); above it as triangle-tiled products (3 resp. 4 launches per step).
# The performance model's crossover (bench.model.ns_crossover, printed by `python -m bench --model -v`;
# tests/test_model.py keeps the two equal): the row blocks compute more FLOPs than the triangle tiles
# (full rows, and the column groups' repeated products) in fewer launches, which pays off only while
# launches dominate a step.
ROWS_MAX_C = 320
# The tiled products use 128 x 128 tiles instead of 64 x 64 (a quarter of the operand traffic per FLOP)
# from this many variables, when those tiles still make this many waves of programs on the GPU (a short
# last wave idles SMs; e.g. C = 4096: 528 triangle tiles per view, 4 waves on an H200's 132 SMs).
LARGE_TILE_MIN_C = 1024
LARGE_TILE_MIN_WAVES = 4


def _use_rows(C: int) -> bool:
    return C <= ROWS_MAX_C


def _row_block(C: int) -> int:
    """BLOCK_M of the row-block kernels (their grid is C / BLOCK_M per view)."""
    if small_blocks():
        return block(C, 0, interp=128)
    return 16 if C <= 256 else 32


# Column groups of the row-block kernels: while row blocks x views leave SMs idle, each row block is
# split over up to MAX_COL_GROUPS programs by output columns (the products a later one needs whole rows
# of are computed in full by each group: about 2.25 instead of 3 products per program in the forward,
# 0.5 instead of 2 and 1.75 instead of 4 in the backward, and 4x the programs: 128 for 2 views of C = 256).
MAX_COL_GROUPS = 4
MIN_GROUP_COLS = 64  # columns per group at least (a group narrower than a column block wastes it)


def _col_groups(C: int, B: int, bm: int, device: torch.device) -> tuple[int, int]:
    """(groups, columns per group CW, a multiple of 16) of the row-block kernels for C variables, B views."""
    programs = triton.cdiv(C, bm) * B
    groups = 1
    while (groups < MAX_COL_GROUPS and 2 * groups * programs <= sm_count(device)
           and C >= 2 * groups * MIN_GROUP_COLS):
        groups *= 2
    cw = triton.cdiv(triton.cdiv(C, groups), 16) * 16
    return triton.cdiv(C, cw), cw


def _rows_tuned(C: int) -> dict:
    """The row-block kernels' tuned BLOCK_N / BLOCK_K as the interpreter gets them (the GPU autotunes)."""
    b = block(C, 0, interp=128)
    return tuned_kwargs(**({"BLOCK_N": b, "BLOCK_K": b} if small_blocks() else {"BLOCK_N": 64, "BLOCK_K": 32}))


def _tile(C: int, B: int, prec: str, sym: bool, device: torch.device) -> int:
    """The square output tile of `_ns_mm_kernel` (exact fp32 "ieee" products keep 64: their operand
    tiles live in registers)."""
    n = triton.cdiv(C, 128)
    tiles = (n * (n + 1) // 2 if sym else n * n) * B
    if (small_blocks() or prec == "ieee" or C < LARGE_TILE_MIN_C
            or tiles < LARGE_TILE_MIN_WAVES * sm_count(device)):
        return block(C, gpu=64)
    return 128


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
    prec = dot_precision()
    bs = _tile(C, B, prec, sym, out.device)
    nt = triton.cdiv(C, bs)
    zz = z if z is not None else out
    _ns_mm_kernel[(nt, nt, B)](
        out, zz, *flat, C, out.stride(0), zz.stride(0), *[t.stride(0) for t in flat],
        float(alpha), float(beta), NPROD=len(prods), HAS_Z=z is not None, SYM=sym,
        BLOCK=bs, PREC=prec, **tuned_kwargs(BLOCK_K=block(C, gpu=32)))
    return out


def newton_schulz_fwd(S: torch.Tensor, Ps: torch.Tensor, powers: torch.Tensor) -> None:
    """Fill Ps[:, 1:] (P_2..P_T) and powers (P_k^2, P_k^3, k = 1..T-1) in place; Ps[:, 0] = P_1 is given."""
    B, T, C = Ps.shape[0], Ps.shape[1], S.shape[-1]
    prec = dot_precision()
    scratch = None
    for k in range(1, T):
        P, P2, P3, Pn = Ps[:, k - 1], powers[:, k - 1, 0], powers[:, k - 1, 1], Ps[:, k]
        if _use_rows(C):
            for t in (S, P, P2, P3, Pn):
                _check_square(t, C)
            bm = _row_block(C)
            groups, cw = _col_groups(C, B, bm, S.device)
            if scratch is None:
                scratch = torch.empty(groups - 1, B, 2, C, C, device=S.device, dtype=torch.float32)
            _ns_fwd_rows_kernel[(triton.cdiv(C, bm), groups, B)](
                P, P2, P3, Pn, S, scratch, C, cw, P.stride(0), P2.stride(0), P3.stride(0), Pn.stride(0),
                BLOCK_M=bm, PREC=prec, **_rows_tuned(C))
        else:
            ns_mm(P2, [(P, P)], sym=True)
            ns_mm(P3, [(P2, P)], sym=True)
            ns_mm(Pn, [(P3, S)], alpha=-0.5, z=P, beta=1.5, sym=True)


def newton_schulz_bwd(G: torch.Tensor, S: torch.Tensor, Ps: torch.Tensor,
                      powers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Sbar, ss) given G = dL/dP_T (B, C, C) contiguous, through the T Newton-Schulz steps: Sbar = dL/dS
    (B, C, C) contiguous and ss (B, n) fp32, partial sums of the Frobenius product <Sbar, S> (summed over
    the last axis in order; the covariance backward needs it, docs/math.md §5). G is overwritten.
    The first step writes Sbar (no zero fill) and the last one adds the k = 1 term -0.5 G and computes
    ss in its epilogue (row-block path) or in one `_ns_bwd_finish_kernel` launch (tiled path, T = 1)."""
    B, T, C = Ps.shape[0], Ps.shape[1], S.shape[-1]
    if T == 0:
        return torch.zeros_like(S), torch.zeros(B, 1, device=S.device, dtype=torch.float32)
    for t in (G, S):
        _check_square(t, C)
    Sbar = torch.empty_like(S)
    prec = dot_precision()
    rows = _use_rows(C) and T > 1
    bm = _row_block(C)
    groups, cw = _col_groups(C, B, bm, S.device) if rows else (1, C)
    grid = (triton.cdiv(C, bm), groups, B)
    ss = torch.empty(B, grid[0] * groups, device=S.device, dtype=torch.float32)
    if T > 1:
        H, G2 = torch.empty_like(G), torch.empty_like(G)
        U = torch.empty(groups, B, C, C, device=S.device, dtype=torch.float32)
    for k in range(T, 1, -1):
        Bk, B2, B3 = Ps[:, k - 2], powers[:, k - 2, 0], powers[:, k - 2, 1]
        first, last = k == T, k == 2
        if rows:
            for t in (Bk, B2, B3):
                _check_square(t, C)
            _ns_bwd_rows_a_kernel[grid](Sbar, H, G, S, B3, C, cw, B3.stride(0), FIRST=first, BLOCK_M=bm,
                                        PREC=prec, **_rows_tuned(C))
            _ns_bwd_rows_b_kernel[grid](G2, U, G, H, Bk, B2, Sbar, S, ss, C, cw, Bk.stride(0), B2.stride(0),
                                        LAST=last, BLOCK_M=bm, PREC=prec, **_rows_tuned(C))
        else:
            ns_mm(Sbar, [(B3, G)], alpha=-0.5, z=None if first else Sbar, beta=0.0 if first else 1.0)
            ns_mm(H, [(G, S)])
            ns_mm(U[0], [(Bk, H)])
            ns_mm(G2, [(H, B2), (U[0], Bk), (B2, H)], alpha=-0.5, z=G, beta=1.5)
        G, G2 = G2, G
    if not rows:  # k = 1 (B = P_0 = I): Sbar += -0.5 G, and <Sbar, S>
        _ns_bwd_finish_kernel[(grid[0], B)](Sbar, G, S, ss, C, HAS_SBAR=T > 1, BLOCK_M=bm,
                                            BLOCK_N=block(C, gpu=128, interp=128))
    return Sbar, ss


# ------------------------------------------------------------------ costs (bench/model.py)
# FLOPs as computed (padding tiles aside): the row-block kernels do full rows, `_ns_mm_kernel` with SYM
# only the tiles on and above the diagonal. Bytes are global-memory traffic: every C x C fp32 matrix a
# launch touches once, and in `_ns_mm_kernel` an X operand larger than half the L2 once per tile column
# that reads it (programs run in grid order: one tile column at a time, every row panel of X).
_L2_HALF = 30 * 2**20


def _mats(args: dict, grid, n: int) -> float:
    """Bytes of n (B, C, C) fp32 matrices."""
    return 4.0 * n * grid[-1] * args["C"] ** 2


def _mm_cost(args: dict, grid) -> Work:
    C, nt, B = args["C"], grid[0], grid[2]
    tiles = nt * (nt + 1) / 2 if args["SYM"] else nt * nt
    frac = tiles / (nt * nt)
    x_reads = nt * frac if 4.0 * C * C > _L2_HALF else 1.0
    nprod = args["NPROD"]
    flops = nprod * 2.0 * C**3 * B * frac
    rd = 4.0 * B * C * C * (nprod * (x_reads + 1) + (1 if args["HAS_Z"] else 0))
    return Work(flops, rd + _mats(args, (B,), 1), programs=int(tiles) * B)  # SYM: the lower tiles return at once


COSTS = {
    "_ns_mm_kernel": _mm_cost,
    # grid (row blocks, column groups g, B). P^2, P^3 rows in full per group, P_k split: reads P and S,
    # writes P^2, P^3 (the other groups' copies to scratch) and P_k
    "_ns_fwd_rows_kernel": lambda a, g: Work(2.0 * a["C"] ** 3 * g[2] * (2 * g[1] + 1),
                                             _mats(a, g, 5 + 2 * (g[1] - 1))),
    # Sbar (-)= 0.5 B^3 G, H = G S, split exactly: reads G, S, B^3 (and Sbar), writes Sbar, H
    "_ns_bwd_rows_a_kernel": lambda a, g: Work(4.0 * a["C"] ** 3 * g[2], _mats(a, g, 5 if a["FIRST"] else 6)),
    # U = B H in full per group (scratch), G_new (3 products) split: reads G, H, B, B^2, writes U, G_new;
    # LAST: Sbar read and written, S
    "_ns_bwd_rows_b_kernel": lambda a, g: Work(2.0 * a["C"] ** 3 * g[2] * (g[1] + 3),
                                               _mats(a, g, (9 if a["LAST"] else 6) + (g[1] - 1))),
    "_ns_bwd_finish_kernel": lambda a, g: Work(3.0 * a["C"] ** 2 * g[1],
                                               _mats(a, (g[1],), 4 if a["HAS_SBAR"] else 3)),
}
