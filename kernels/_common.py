"""Shared helpers of the Triton kernels: interpreter detection, matmul precision, block sizes."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision() -> str:
    """tl.dot input_precision for fp32 operands: follows torch.get_float32_matmul_precision()
    ("highest" -> exact fp32 "ieee", else "tf32"). The interpreter computes "tf32" as fp32."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def block(n: int, gpu: int, interp: int = 128, lo: int = 16) -> int:
    """A power-of-two block for a dimension of size n: `gpu` on the GPU, up to `interp` under the
    interpreter (few, large programs: the interpreter costs ~ms per program and loop step)."""
    hi = interp if interpreting() else gpu
    return max(lo, min(hi, triton.next_power_of_2(n)))


def num_warps(tile_elems: int) -> int:
    return 8 if tile_elems >= 128 * 128 else 4
