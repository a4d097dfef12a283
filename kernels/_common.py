"""Shared helpers of the Triton kernels: interpreter detection, matmul precision, block sizes.

Matmul precision (every tl.dot accumulates in fp32). The mode, set by `set_dot_precision` or the
environment variable INTL_OPS_DOT_PRECISION, is one of
  "auto"    (default) tensor cores at fp32 accuracy: fp32 operands as "tf32x3" (three tf32 MMAs,
            error near fp32's), or "tf32" when the user allowed tf32 matmuls in torch
            (torch.set_float32_matmul_precision("high"/"medium") or
            torch.backends.cuda.matmul.fp32_precision = "tf32"); fp16/bf16 input tiles go to the
            tensor cores in their own dtype (the products are exact, the sums fp32).
  "tf32x3"  as auto, but fp32 operands always as tf32x3.
  "tf32"    fp32 operands as one tf32 MMA (10-bit mantissa: ~1e-3 relative error, fastest).
  "ieee"    exact fp32 FMA, no tensor cores (slow: ~67 TFLOP/s peak on H200); fp16/bf16 tiles
            are upcast to fp32 too. The choice for bit-level comparisons with a CPU.
Why not torch's own default: torch's default ("highest") would mean "ieee" here, i.e. no tensor
cores at all, for a whitening whose accuracy tf32x3 already matches.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

DOT_MODES = ("auto", "tf32x3", "tf32", "ieee")
_dot_mode: str | None = None  # None: not chosen yet, INTL_OPS_DOT_PRECISION (default "auto") decides once
# Tests and the ahead-of-time compile may ask the interpreter to use the GPU's block sizes.
_force_gpu_blocks = False
# The performance model (bench/model.py) sizes grids for a GPU it does not have: its SM count.
_assumed_sms: int | None = None


class Work(NamedTuple):
    """What one kernel launch does, for the performance model: FLOPs (multiply-add = 2), bytes moved
    to or from global memory, and the programs that do work when some of the grid's return at once
    (the lower-triangle programs of a symmetric product; None: all of them). Each module's COSTS maps
    a kernel's name to a function of its bound arguments and grid that returns this."""
    flops: float
    bytes: float
    programs: int | None = None


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_dot_precision(mode: str) -> None:
    """Set the matmul precision of every Triton kernel: one of DOT_MODES (see the module docstring)."""
    global _dot_mode
    if mode not in DOT_MODES:
        raise ValueError(f"dot precision mode must be one of {DOT_MODES}, got {mode!r}")
    _dot_mode = mode


def get_dot_precision() -> str:
    """The mode set by set_dot_precision, else the environment variable INTL_OPS_DOT_PRECISION, read at
    the first launch (not at every one), else "auto"."""
    global _dot_mode
    if _dot_mode is None:
        env = os.environ.get("INTL_OPS_DOT_PRECISION", "auto")
        if env not in DOT_MODES:
            raise ValueError(f"INTL_OPS_DOT_PRECISION must be one of {DOT_MODES}, got {env!r}")
        _dot_mode = env
    return _dot_mode


def torch_allows_tf32() -> bool:
    """Whether the user allowed tf32 for CUDA fp32 matmuls, through either of torch's APIs. The legacy
    getter is cheap (read at every launch); it raises once the new API set tf32 (torch 2.9+), and then
    the new attribute decides."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:
        new = torch.backends.cuda.matmul.fp32_precision
        if new == "none":  # inherits the global setting
            new = torch.backends.fp32_precision
        return new == "tf32"


def dot_precision() -> str:
    """tl.dot input_precision for fp32 operands under the current mode (launchers read it once per
    launch and pass it to half_dot and num_warps)."""
    mode = get_dot_precision()
    if mode == "auto":
        return "tf32" if torch_allows_tf32() else "tf32x3"
    return mode


def half_dot(dtype: torch.dtype, prec: str) -> bool:
    """True when input tiles of `dtype` (fp16/bf16) go to tl.dot in their own dtype, on the tensor
    cores, instead of upcast to fp32: not with exact products (prec "ieee"), and never for bf16 under
    the interpreter, whose bf16 dot is wrong."""
    if dtype not in (torch.float16, torch.bfloat16) or prec == "ieee":
        return False
    return not (interpreting() and dtype == torch.bfloat16)


@triton.jit
def dot_acc(b_x, b_y, b_acc, half_ty, HALF_DOT: tl.constexpr, PREC: tl.constexpr):
    """b_acc + b_x @ b_y of fp32 tiles: on the tensor cores in `half_ty` (the fp16/bf16 input's dtype,
    fp32 sums) when HALF_DOT, else with input_precision PREC."""
    if HALF_DOT:
        return tl.dot(b_x.to(half_ty), b_y.to(half_ty), b_acc)
    return tl.dot(b_x, b_y, b_acc, input_precision=PREC)


@triton.jit
def guarded_inverse(t):
    """1/t, 0 where t == 0: a constant input (trace 0) gives zero output and gradient (docs/math.md §3)."""
    return tl.where(t > 0, 1.0 / tl.where(t > 0, t, 1.0), 0.0)


@triton.jit
def guarded_rsqrt(t):
    """1/sqrt(t), 0 where t == 0 (as guarded_inverse)."""
    return tl.where(t > 0, 1.0 / tl.sqrt(tl.where(t > 0, t, 1.0)), 0.0)


@triton.jit
def nc_tile(N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (BLOCK_N observations x BLOCK_C variables) tile of a program on grid (N tiles, C tiles, B):
    (i_b, o_n, o_c, m_n, m_c), the batch index and the row offsets as int64 (N * stride may pass 2^31)."""
    i_n, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return i_b, o_n, o_c, o_n < N, o_c < C


# The cost model's L2 rule (COSTS of every kernels module, bench/model.py): an operand re-read within a
# span of traffic up to about half the H200's L2 stays in it (the other half for the outputs streamed
# out and the other operands).
L2_RESIDENT_BYTES = 25 * 2**20

# Autotuning (GPU only, `autotune`). Configs change only num_warps / num_stages and parameters such as
# BLOCK_K, never a block size that sizes the grid: the launchers choose those. The interpreter's single
# config sets nothing: its launchers pass the tuned parameters themselves (`tuned_kwargs`), so that
# gpu_block_sizes() still gives the GPU's tiles there. Decided when the kernels are defined.
TUNE_ON_GPU = not interpreting()
INTERPRETER_CONFIG = triton.Config({}, num_warps=4)


def gpu_configs(block_k: tuple[int, ...] = ()) -> list:
    """The GPU's configs of an autotuned kernel: num_warps {4, 8} x num_stages {2, 3}, or for a K loop
    (block_k given) BLOCK_K in block_k x num_warps {4, 8} at 3 stages plus BLOCK_K = 16 with 8 warps at
    2 and 3 stages, the only K tile of exact fp32 "ieee" products (larger ones spill). prune_spills
    keeps the ones that fit."""
    if not block_k:
        return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
    return ([triton.Config({"BLOCK_K": k}, num_warps=w, num_stages=3) for k in block_k for w in (4, 8)]
            + [triton.Config({"BLOCK_K": 16}, num_warps=8, num_stages=s) for s in (2, 3)])


def prune_spills(tile_elems: Callable[[dict], int], sizes: tuple[str, ...], wide_k_warps: int = 4,
                 wide_k_unaligned: bool = True):
    """early_config_prune for an autotuned kernel: drops the configs that spill registers on sm_90
    (bench/aot_compile.py checks them): fewer warps than `_common.num_warps` asks for (exact fp32 "ieee"
    products and sizes not multiples of 16 want 8), K tiles other than 16 for "ieee" and 16 for the
    rest, K tiles of 64 with fewer than `wide_k_warps` warps for tf32x3 products (3 MMAs on split
    operands) or, unless `wide_k_unaligned`, for sizes not multiples of 16 (fp32 operands), and K tiles
    of 64 for C <= 32 (mostly masked). `tile_elems(kwargs)`: the program's output tile; `sizes`: the
    int arguments whose 16-divisibility the launcher's aligned() checks."""
    def fits(c, prec, need, wide, al, half):
        if c.num_warps < need:
            return False
        k = c.kwargs.get("BLOCK_K")
        if k is None:
            return True
        if (k == 16) != (prec == "ieee"):
            return False
        if k <= 32:
            return True
        return (wide and (prec != "tf32x3" or c.num_warps >= wide_k_warps)
                and (al or half or wide_k_unaligned))

    def prune(configs, nargs, **kwargs):
        prec = kwargs["PREC"]
        al = aligned(*(nargs[n] for n in sizes if nargs[n] != 1))
        need = num_warps(tile_elems(kwargs), prec, al)
        keep = [c for c in configs if fits(c, prec, need, nargs["C"] > 32, al, kwargs.get("HALF_DOT", False))]
        return keep or configs[-1:]
    return prune


def tuned_kwargs(**interp_only) -> dict:
    """What the launcher passes for the autotuned parameters: nothing on the GPU, its own choice under
    the interpreter (whose single config sets none, so gpu_block_sizes() can still change BLOCK_K)."""
    return {} if TUNE_ON_GPU else interp_only


def reread_bytes(nbytes: float, reads: int, span: float) -> float:
    """Global-memory bytes of an operand of `nbytes` read `reads` times by the grid, whose reads of one
    tile are `span` bytes of traffic apart: once if that span stays in L2 (L2_RESIDENT_BYTES)."""
    return nbytes if reads <= 1 or span <= L2_RESIDENT_BYTES else nbytes * reads


def autotune(configs: list, key: list[str], prune=None, restore_value=None):
    """@triton.autotune on the GPU: per value of `key` (argument names; tensor dtypes join the key
    automatically) the configs that `prune(configs, named_args, **kwargs)` keeps (those that compile
    without register spills there: bench/aot_compile.py checks every one) are timed once and the fastest
    is kept. Timing runs the kernel several times: an autotuned kernel must be idempotent, or name its
    in-place outputs in `restore_value`. Under the interpreter: INTERPRETER_CONFIG alone, never timed
    (several configs fail without a GPU driver)."""
    if not TUNE_ON_GPU:
        return triton.autotune([INTERPRETER_CONFIG], key=key)
    return triton.autotune(configs, key=key, restore_value=restore_value,
                           prune_configs_by={"early_config_prune": prune} if prune else None)


@triton.jit
def cc_tile(i_i, i_j, C, BLOCK_C: tl.constexpr):
    """The (i_i, i_j) tile of BLOCK_C x BLOCK_C of a C x C matrix: (o_i, o_j, m_i, m_j), its row and column
    offsets and their masks."""
    o_i = i_i * BLOCK_C + tl.arange(0, BLOCK_C)
    o_j = i_j * BLOCK_C + tl.arange(0, BLOCK_C)
    return o_i, o_j, o_i < C, o_j < C


@contextlib.contextmanager
def gpu_block_sizes():
    """Use the GPU's block sizes under the interpreter too (tests of the multi-tile paths)."""
    global _force_gpu_blocks
    old, _force_gpu_blocks = _force_gpu_blocks, True
    try:
        yield
    finally:
        _force_gpu_blocks = old


@contextlib.contextmanager
def assume_gpu(sms: int):
    """Size grids for a GPU with `sms` streaming multiprocessors whatever the device (bench/model.py
    records the launches a GPU would get while running on CPU tensors)."""
    global _assumed_sms
    old, _assumed_sms = _assumed_sms, int(sms)
    try:
        yield
    finally:
        _assumed_sms = old


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors the grids are sized for: the assumed GPU's (assume_gpu), the CUDA
    device's, else 1 (the interpreter runs programs one by one: more of them only costs time)."""
    if _assumed_sms is not None:
        return _assumed_sms
    if small_blocks() or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def small_blocks() -> bool:
    """True for the interpreter's few-large-programs block sizes."""
    return interpreting() and not _force_gpu_blocks


def block(n: int, gpu: int, interp: int = 128, lo: int = 16) -> int:
    """A power-of-two block for a dimension of size n: `gpu` on the GPU, up to `interp` under the
    interpreter (few, large programs: the interpreter costs ~ms per program and loop step)."""
    hi = interp if small_blocks() else gpu
    return max(lo, min(hi, triton.next_power_of_2(n)))


def aligned(*sizes: int) -> bool:
    """True if every size (and stride) is a multiple of 16, as Triton's divisibility hints want."""
    return all(s % 16 == 0 for s in sizes)


def strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """The non-unit strides of the tensors (what decides aligned())."""
    return tuple(s for t in tensors for s in t.stride() if s != 1)


def num_warps(tile_elems: int, prec: str | None = None, is_aligned: bool = True) -> int:
    """Warps for a program whose output tile has `tile_elems` elements and whose products (if any) run
    at precision `prec`. 8 where 4 spill registers (bench/aot_compile.py checks every launch for sm_90):
    exact fp32 products ("ieee": FMA, no tensor cores) hold their operand tiles in registers, and sizes
    that are not multiples of 16 lose Triton's divisibility hints (scalar loads, more address registers)."""
    if tile_elems >= 128 * 128 or not is_aligned or prec == "ieee":
        return 8
    return 4
