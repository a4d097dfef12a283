"""Triton backend of the `intl` ops: the functions of intl_ops.reference, computed by intl_ops.kernels.

Same signatures and the same saved-tensor layout as the reference (docs/math.md §8):
y (*, m, d) in x's dtype, contiguous; mean (*, C), S (*, C, C), tr (*), Ps (*, T, C, C),
powers (*, T-1, 2, C, C), v (*, C), all fp32 for fp16/bf16/fp32 inputs.

Dtypes: fp16, bf16 and fp32 run the kernels (fp32 accumulation; by default on the tensor cores at
fp32 accuracy: fp32 operands as tf32x3, fp16/bf16 input tiles in their own dtype; see
intl_ops/kernels/_common.py and set_dot_precision). fp64 is not compiled into the kernels:
`supports` declines it, so backend="triton" runs fp64 inputs with the reference math (the oracle's
precision) on the same device and never fails on a dtype.

Devices: CUDA tensors when a GPU and Triton are present; CPU tensors only under the Triton
interpreter (TRITON_INTERPRET=1 set before this module is imported), as CI runs it.

Launches per call (the B views batched in every launch; T Newton steps; C the number of variables,
small C <= intl_ops.kernels.newton_schulz.ROWS_MAX_C), no torch compute op besides allocation
(T = 0 adds one torch.eye for P_T = I):
  iternorm_fwd: 2 (covariance: split-N partials, then their reduce with the trace, S and P_1) +
                (T-1) small C / 3 (T-1) large C (Newton-Schulz) + 2 (apply: Y, then v): T + 3 at small
                C (7 at T = 4).
  iternorm_bwd: 2 (G = dL/dP_T: split-N partials, then their reduce; 1 when N is not split) + the
                Newton-Schulz backward (intl_ops.kernels.newton_schulz.newton_schulz_bwd: 2 (T-1) small C /
                4 (T-1) + 1 large C) + 1 (dA, which also does the trace / covariance chain rule from
                Sbar and the partial sums of <G, P_T> and <Sbar, S>): 2 T + 2 at small C (10 at T = 4).
  intl_head_fwd / _bwd (intl_loss's alignment and trace terms, intl_ops/kernels/loss_head.py): 2 / 1.
FLOPs (multiply-add = 2): forward ~C^2 N (triangle covariance) + ~7 C^3 (T-1) small C (the row blocks'
full rows, more with column groups) or ~3 C^3 (T-1) large C + 2 N C^2 (apply); backward 2 N C^2 (G) +
12-18 C^3 (T-1) + 4 N C^2 (dA). `python -m bench --model -v` lists every launch with its FLOPs, bytes
and predicted H200 time (bench/model.py, from each kernels module's COSTS).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from . import reference
from .reference import IterNormSaved, as_observations

_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    from intl_ops.kernels.apply import apply_bwd, apply_fwd
    from intl_ops.kernels.covariance import covariance_fwd
    from intl_ops.kernels.newton_schulz import newton_schulz_bwd, newton_schulz_fwd
    from intl_ops.kernels import nmse as nmse_kernels
    from intl_ops.kernels import trace_loss as trace_loss_kernels
    from intl_ops.kernels._common import set_dot_precision  # noqa: F401  (intl_ops.set_dot_precision)

    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001  (reported by unavailable_reason)
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return f"triton kernels cannot be imported ({_IMPORT_ERROR})"
    if device.type == "cuda":
        if _INTERPRET_AT_IMPORT:
            return "the Triton kernels were defined under TRITON_INTERPRET=1: they run on CPU tensors only"
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        if _INTERPRET_AT_IMPORT and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                "before importing intl_ops (slow; for testing)")
    return f"the Triton backend runs on cuda devices (cpu under TRITON_INTERPRET=1), not {device.type}"


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> str | None:
    """Every op function defined here, for the dtypes the kernels are compiled for."""
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernels take float16, bfloat16 and float32, not {dtype}"
    return None


def _guard(t: Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _flat(t: Tensor) -> Tensor:
    """(*, r, c) -> (B, r, c), a view where possible."""
    return t.reshape(-1, *t.shape[-2:])


def iternorm_fwd(x: Tensor, iters: int, axis: int) -> IterNormSaved:
    batch = x.shape[:-2]
    x3 = _flat(x)
    a = as_observations(x3, axis)
    B, N, C = a.shape
    shapes = reference.saved_shapes((B,), C, iters)
    Ps = torch.empty(shapes["Ps"], device=x.device, dtype=torch.float32)
    powers = torch.empty(shapes["powers"], device=x.device, dtype=torch.float32)
    y = torch.empty(x3.shape, device=x.device, dtype=x.dtype)
    with _guard(x):
        mean, S, tr = covariance_fwd(a, Ps[:, 0] if iters >= 1 else None)
        newton_schulz_fwd(S, Ps, powers)
        v = apply_fwd(a, mean, reference.last_iterate(S, Ps, iters), tr, as_observations(y, axis))
    return IterNormSaved(y.reshape(x.shape), mean.reshape(*batch, C), S.reshape(*batch, C, C),
                         tr.reshape(batch), Ps.reshape(*batch, *Ps.shape[1:]),
                         powers.reshape(*batch, *powers.shape[1:]), v.reshape(*batch, C))


def iternorm_bwd(grad_y: Tensor, grad_v: Tensor, y: Tensor, x: Tensor, mean: Tensor, S: Tensor,
                 tr: Tensor, Ps: Tensor, powers: Tensor, iters: int, axis: int) -> Tensor:
    x3 = _flat(x)
    a = as_observations(x3, axis)
    B, N, C = a.shape
    S3, Ps3 = S.reshape(B, C, C), Ps.reshape(B, iters, C, C)
    powers3 = powers.reshape(B, max(iters - 1, 0), 2, C, C)
    tr3 = tr.reshape(B).contiguous()
    P_T = reference.last_iterate(S3, Ps3, iters)
    gx = torch.empty(x3.shape, device=x.device, dtype=x.dtype)
    with _guard(x):
        # the kernels do the whole C x C chain rule (trace, covariance) around the Newton-Schulz backward
        apply_bwd(a, mean.reshape(B, C).contiguous(), P_T, tr3,
                  as_observations(_flat(grad_y), axis), as_observations(_flat(y), axis), grad_v.reshape(B, C),
                  lambda G: newton_schulz_bwd(G, S3, Ps3, powers3), as_observations(gx, axis))
    return gx.reshape(x.shape)


def trace_loss_fwd(y: Tensor, axis: int) -> Tensor:
    with _guard(y):
        return trace_loss_kernels.trace_loss_fwd(as_observations(_flat(y), axis)).reshape(y.shape[:-2])


def trace_loss_bwd(grad: Tensor, y: Tensor, axis: int) -> Tensor:
    y3 = _flat(y)
    gy = torch.empty(y3.shape, device=y.device, dtype=y.dtype)
    with _guard(y):
        trace_loss_kernels.trace_loss_bwd(grad, as_observations(y3, axis), as_observations(gy, axis))
    return gy.reshape(y.shape)


def nmse_fwd(a: Tensor, b: Tensor) -> Tensor:
    with _guard(a):
        return nmse_kernels.nmse_fwd(_flat(a), _flat(b)).reshape(a.shape[:-2])


def nmse_bwd(grad: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    with _guard(a):
        ga, gb = nmse_kernels.nmse_bwd(grad, _flat(a), _flat(b))
    return ga.reshape(a.shape), gb.reshape(b.shape)


def intl_head_fwd(y: Tensor, v: Tensor, target: Tensor | None, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """intl_loss's head (docs/math.md §4.2) by intl_ops.kernels.loss_head: (loss, align, trace), 0-dim fp32;
    2 launches (the pairs' row-block cos sums, then one program finishing them with the trace terms)."""
    from intl_ops.kernels import loss_head

    with _guard(y):
        return loss_head.head_fwd(_flat(y), v.reshape(-1, v.shape[-1]), target, beta)


def intl_head_bwd(grad: Tensor, y: Tensor, v: Tensor, target: Tensor | None, beta: float) -> tuple[Tensor, Tensor]:
    """(dL/dy in y's dtype, dL/dv) of the head: 1 launch (view 0 sums the gradients of the pairs it is in)."""
    from intl_ops.kernels import loss_head

    with _guard(y):
        dy, dv = loss_head.head_bwd(grad, _flat(y), v.reshape(-1, v.shape[-1]), target, beta)
    return dy.reshape(y.shape), dv.reshape(v.shape)
