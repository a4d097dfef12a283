"""CUDA C++ backend (csrc/): the `intl` math with hand-written Hopper kernels where they pay.

Custom kernels (torch.ops.intl_cuda.*, csrc/intl_kernels.cu, sm_90a), all on tensor cores in 3xTF32
form (fp32-level accuracy, as the fp32 reference), reading the input through its strides (no transposed
copy for axis=0) with the centring fused into the tile loads (Ac is never materialised):
  centered_gram     Sigma = Ac^T Ac / (N - 1): upper triangle of 64 x 64 tiles (mirrored), split over N.
  ns_fwd            the whole Newton-Schulz forward for C <= 256 in ONE launch (a thread-block cluster per
                    matrix, S and the iterates in distributed shared memory): S, tr, P_1..P_T, the powers
                    (P_k^2, P_k^3) and the output variances v = diag(P_T S P_T) (the trace loss needs no
                    pass over y).
  centered_matmul   y = Ac W, written in x's dtype and layout.
  ns_bwd            the whole Newton-Schulz backward for C <= 256 in one launch: M = (Sigmabar + Sigmabar^T)/(N-1).
  centered_tmatmul  Wbar = Ac^T Ybar;   grad_input  Abar = Ybar W^T + Ac M, in x's dtype and layout.
Composed with torch ops: the column means and Ybar (the incoming gradient plus the trace-loss term,
centred: one elementwise pass). C > 256: centered_gram, then the Newton-Schulz loop, y and the whole
backward in torch (the reference's math).
float64 inputs use the reference backend (the kernels compute in fp32).
set_ns_variant(operand=, cluster=) picks how ns_fwd / ns_bwd run (benchmark knobs, same results).

Loading (importing this module never compiles anything and never fails):
  1. `intl_ops._C`, built by `pip install` (setup.py) when a CUDA toolkit was found;
  2. else, with env INTL_OPS_JIT=1, a JIT build at import (ninja, cached in build_dir(): nothing is
     recompiled while csrc/ and the flags are unchanged);
  3. else nothing: call `build()` explicitly (e.g. on a machine where the package was installed
     without the extension: the csrc/ sources are installed with it). `unavailable_reason(device)`
     says which case applies.
Both builds use the one definition in intl_ops/cuda_build.py (sources, flags, archs, cache folder);
its functions are re-exported here. Env: INTL_OPS_CUDA_ARCH (default "90a"; ";"-separated, >= 90:
the kernels use clusters), INTL_OPS_CUDA_BUILD_DIR (the JIT cache folder).
"""
from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from . import cuda_build, reference
from .cuda_build import build_dir, cuda_arches, cuda_home, host_flags, nvcc_flags, toolkit_reason  # noqa: F401
from .reference import IterNormSaved, as_observations

NS_MAX_C = 256  # the one-launch Newton-Schulz kernels' limit (csrc/intl_cuda.h kNsMaxC)
NS_OPERANDS = ("dsmem", "l2")  # set_ns_variant's choices (csrc/intl_cuda.h NsVariant)
NS_CLUSTERS = (8, 16)

_K = torch.ops.intl_cuda  # the kernels (tests swap in an emulation of their math to check the glue on CPU)
_loaded: str | None = None  # where the ops came from, once registered
_load_error: str | None = None


# ------------------------------------------------------------------ building and loading
def build(verbose: bool = False) -> str:
    """Compile csrc/ (or reuse the cached build) and register torch.ops.intl_cuda.*; returns where from.

    A no-op when the ops are already registered (e.g. by intl_ops._C). Takes ~1-3 minutes the first time.
    """
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    lib = cuda_build.build(verbose=verbose)
    _loaded, _load_error = f"JIT build {lib}", None
    _register_fakes()
    return _loaded


def _register_fakes() -> None:
    """Shape functions of the intl_cuda ops, for torch.compile / opcheck (FakeTensor) tracing."""
    def gram(a, mean):
        return a.new_empty((a.shape[0], a.shape[2], a.shape[2]), dtype=torch.float32)

    def fwd(sigma, iters):
        B, C = sigma.shape[0], sigma.shape[1]
        new = sigma.new_empty
        return (new(B, C, C), new(B), new(B, iters, C, C), new(B, max(iters - 1, 0), 2, C, C), new(B, C))

    def bwd(wbar, S, tr, Ps, powers, iters, n_obs):
        return torch.empty_like(wbar, memory_format=torch.contiguous_format)

    def matmul(a, mean, w, transpose_out):
        B, N, C = a.shape
        return a.new_empty((B, C, N) if transpose_out else (B, N, C))

    def tmatmul(a, mean, g):
        return gram(a, mean)

    def grad_input(g, w, a, mean, mm, transpose_out):
        return matmul(a, mean, w, transpose_out)

    for name, fn in (("centered_gram", gram), ("ns_fwd", fwd), ("ns_bwd", bwd), ("centered_matmul", matmul),
                     ("centered_tmatmul", tmatmul), ("grad_input", grad_input)):
        torch.library.register_fake(f"intl_cuda::{name}", fn)


def _try_load() -> None:
    global _loaded, _load_error
    try:
        importlib.import_module("intl_ops._C")
        _loaded = "intl_ops._C"
        _register_fakes()
        return
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "intl_ops._C"
        _load_error = None if missing else f"intl_ops._C failed to load ({exc})"
    if os.environ.get("INTL_OPS_JIT", "0") == "1":
        try:
            build()
        except Exception as exc:  # a failed build must not break `import intl_ops`
            _load_error = f"the JIT build (INTL_OPS_JIT=1) failed: {type(exc).__name__}: {exc}"
    elif _load_error is None:
        _load_error = ("the CUDA extension is not built: install intl_ops with a CUDA toolkit (setup.py), "
                       "or set INTL_OPS_JIT=1, or call intl_ops.backend_cuda.build()")


def set_ns_variant(operand: str = "dsmem", cluster: int = 8) -> None:
    """How the one-launch Newton-Schulz kernels run from now on (process-wide); every variant computes
    the same function. Called with no arguments it restores the defaults.

    operand: "dsmem" (default) reads the forward's remote operand from the cluster's distributed shared
             memory, "l2" through L2 (bitwise-equal results).
    cluster: 8 (default) or 16 blocks per cluster for 128 < C <= 256 (16 blocks of 16 rows: a
             non-portable size; 8 x 32 is used where the device cannot hold it).
    """
    if operand not in NS_OPERANDS:
        raise ValueError(f"operand must be one of {NS_OPERANDS}, got {operand!r}")
    if isinstance(cluster, bool) or not isinstance(cluster, int) or cluster not in NS_CLUSTERS:
        raise ValueError(f"cluster must be one of {NS_CLUSTERS}, got {cluster!r}")
    if _loaded is None:
        raise RuntimeError(f"set_ns_variant needs the CUDA extension: {_load_error}")
    torch.ops.intl_cuda.set_ns_variant(operand, cluster)


def ns_variant() -> tuple[str, int]:
    """The (operand, cluster) that set_ns_variant last set (default ("dsmem", 8))."""
    if _loaded is None:
        raise RuntimeError(f"ns_variant needs the CUDA extension: {_load_error}")
    operand, cluster = torch.ops.intl_cuda.ns_variant()
    return operand, cluster


def unavailable_reason(device: torch.device) -> str | None:
    if _loaded is None:
        return _load_error
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, got device {device}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    major, minor = torch.cuda.get_device_capability(device)
    built = [a.rstrip("af") for a in cuda_arches()]
    if f"{major}{minor}" not in built:
        return f"the extension is built for sm_{'/'.join(cuda_arches())}, the device is sm_{major}{minor}"
    return None


# ------------------------------------------------------------------ the backend functions
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> str | None:
    """The iternorm ops for fp16/bf16/fp32; the backward only up to NS_MAX_C variables (its one-launch
    Newton-Schulz kernel), the forward at any C (above NS_MAX_C its Newton-Schulz steps are the reference's)."""
    if dtype not in KERNEL_DTYPES:
        return f"the CUDA kernels take float16, bfloat16 and float32, not {dtype}"
    if op == "iternorm_bwd" and shape[-1] > NS_MAX_C:
        return f"the CUDA backward takes C <= {NS_MAX_C} variables, got C = {shape[-1]}"
    return None


def iternorm_fwd(x: Tensor, iters: int, axis: int) -> IterNormSaved:
    batch, (m, d) = x.shape[:-2], x.shape[-2:]
    x3 = x.reshape(-1, m, d)
    a = as_observations(x3, axis)  # (B, N, C) strided view, no copy
    B, N, C = a.shape
    mean = a.mean(dim=1, dtype=torch.float32)
    sigma = _K.centered_gram(a, mean)
    if C <= NS_MAX_C:
        S, tr, Ps, powers, v = _K.ns_fwd(sigma, iters)
        W = reference.whitening_matrix(reference.last_iterate(S, Ps, iters), tr)
        y = _K.centered_matmul(a, mean, W, axis == 0)  # (B, m, d) in x's dtype
    else:  # the reference's stages after the covariance (N < C is common here: v from y is the cheaper way)
        S, tr = reference.trace_normalise(sigma)
        Ps, powers = reference.newton_schulz_fwd(S, iters)
        W = reference.whitening_matrix(reference.last_iterate(S, Ps, iters), tr)
        y, v = reference.apply_fwd(a.float() - mean[:, None, :], W, axis)
        y = y.to(x.dtype)
    return IterNormSaved(y.contiguous().reshape(x.shape), mean.reshape(*batch, C), S.reshape(*batch, C, C),
                         tr.reshape(batch), Ps.reshape(*batch, *Ps.shape[1:]),
                         powers.reshape(*batch, *powers.shape[1:]), v.reshape(*batch, C))


def iternorm_bwd(grad_y: Tensor, grad_v: Tensor, y: Tensor, x: Tensor, mean: Tensor, S: Tensor, tr: Tensor,
                 Ps: Tensor, powers: Tensor, iters: int, axis: int) -> Tensor:
    C = S.shape[-1]
    m, d = x.shape[-2:]
    a = as_observations(x.reshape(-1, m, d), axis)
    B, N, _ = a.shape
    mean, S, tr = mean.reshape(B, C), S.reshape(B, C, C), tr.reshape(B)
    Ps, powers = Ps.reshape(B, *Ps.shape[-3:]), powers.reshape(B, *powers.shape[-4:])
    # Ybar (the reference's, with the trace-loss route), centred over the observations: then Ac^T Ybar
    # is unchanged and Ybar W^T + Ac M already has zero column means (Abar needs no pass).
    ybar = reference.output_grad(grad_y.reshape(-1, m, d), grad_v.reshape(B, C), y.reshape(-1, m, d), axis)
    ybar = ybar - ybar.mean(dim=1, keepdim=True)
    W = reference.whitening_matrix(reference.last_iterate(S, Ps, iters), tr)
    wbar = _K.centered_tmatmul(a, mean, ybar)
    M = _K.ns_bwd(wbar, S, tr, Ps, powers, iters, N)
    return _K.grad_input(ybar, W, a, mean, M, axis == 0).reshape(x.shape)


_try_load()
