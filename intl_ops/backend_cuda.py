"""CUDA C++ backend (csrc/): the `intl` math with hand-written Hopper kernels where they pay.

Custom kernels (torch.ops.intl_cuda.*, csrc/intl_kernels.cu, sm_90a), all on tensor cores in 3xTF32
form (fp32-level accuracy, as the fp32 reference), reading the input through its strides (no transposed
copy for axis=0) with the centring fused into the tile loads (Ac is never materialised):
  centered_gram     Sigma = Ac^T Ac / (N - 1): upper triangle of 64 x 64 tiles (mirrored), split over N.
  ns_fwd            the whole Newton-Schulz forward for C <= 256 in ONE launch (a thread-block cluster per
                    matrix, S and the iterates in distributed shared memory): S, tr, P_1..P_T, (P_k^2, P_k^3)
                    and the output variances v = diag(P_T S P_T) (the trace loss needs no pass over y).
  centered_matmul   y = Ac W, written in x's dtype and layout.
  ns_bwd            the whole Newton-Schulz backward for C <= 256 in one launch: M = (Sigmabar + Sigmabar^T)/(N-1).
  centered_tmatmul  Wbar = Ac^T Ybar;   grad_input  Abar = Ybar W^T + Ac M, in x's dtype and layout.
Composed with torch ops: the column means and Ybar (the incoming gradient plus the trace-loss term,
centred: one elementwise pass). C > 256: centered_gram, then the Newton-Schulz loop, y and the whole
backward in torch (the reference's math).
float64 inputs use the reference backend (the kernels compute in fp32).

Loading (importing this module never compiles anything and never fails):
  1. `intl_ops._C`, built by `pip install` (setup.py) when a CUDA toolkit was found;
  2. else, with env INTL_OPS_JIT=1, a JIT build at import (torch.utils.cpp_extension.load, ninja,
     cached in build_dir(): nothing is recompiled while csrc/ and the flags are unchanged);
  3. else nothing: call `build()` explicitly (e.g. on a machine where the package was installed
     without the extension). `unavailable_reason(device)` says which case applies.
Env: INTL_OPS_CUDA_ARCH (default "90a"; ";"-separated, >= 90: the kernels use clusters),
INTL_OPS_CUDA_BUILD_DIR (the JIT cache folder).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .reference import IterNormSaved, as_observations

NS_MAX_C = 256  # the one-launch Newton-Schulz kernels' limit (csrc/intl_cuda.h kNsMaxC)
_ROOT = Path(__file__).resolve().parent.parent
CSRC = _ROOT / "csrc"
SOURCES = (CSRC / "intl_ops.cpp", CSRC / "intl_kernels.cu")

_K = torch.ops.intl_cuda  # the kernels (tests swap in an emulation of their math to check the glue on CPU)
_loaded: str | None = None  # where the ops came from, once registered
_load_error: str | None = None


# ------------------------------------------------------------------ building and loading
def cuda_arches() -> list[str]:
    """Target architectures, from INTL_OPS_CUDA_ARCH (default "90a"), e.g. "90a" or "90;100a"."""
    arches = [a.strip() for a in os.environ.get("INTL_OPS_CUDA_ARCH", "90a").replace(",", ";").split(";") if a.strip()]
    for a in arches:
        if not a.rstrip("af").isdigit() or int(a.rstrip("af")) < 90:
            raise ValueError(f"INTL_OPS_CUDA_ARCH entries must be compute capabilities >= 90 (thread-block "
                             f"clusters), like '90a', got {a!r}")
    return arches


def nvcc_flags() -> list[str]:
    # --resource-usage prints ptxas' registers / stack / spills per kernel (make cuda-check reads it).
    return ["-O3", "-std=c++17", "--resource-usage",
            *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_arches())]


def host_flags() -> list[str]:
    """g++ flags: pip's CUDA headers (cusparse.h etc., nvidia/cu*/include) searched only after the
    toolkit's own (-idirafter), for torch headers that want them when the toolkit lacks them."""
    flags = ["-O3"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for inc in sorted(Path(root).glob("cu[0-9]*/include")):
            flags += ["-idirafter", str(inc)]
    return flags


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda, else torch's guess from nvcc."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return cand
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def toolkit_reason() -> str | None:
    """None if the extension can be compiled here, else why not (never asks for a GPU)."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA (torch.version.cuda is None)"
    home = cuda_home()
    if home is None or not (Path(home) / "bin" / "nvcc").exists() or not (Path(home) / "include" / "cuda_runtime.h").exists():
        return "no CUDA toolkit found: set CUDA_HOME to a folder with bin/nvcc and include/cuda_runtime.h"
    if not all(p.exists() for p in SOURCES):
        return f"the CUDA sources are not installed (looked for {CSRC})"
    return None


def build_dir() -> Path:
    """The JIT cache: $INTL_OPS_CUDA_BUILD_DIR, else build/ of a source checkout, else ~/.cache/intl_ops."""
    base = os.environ.get("INTL_OPS_CUDA_BUILD_DIR")
    if base is None:
        base = _ROOT / "build" if os.access(_ROOT, os.W_OK) else Path.home() / ".cache" / "intl_ops"
    tag = f"cuda_torch{torch.__version__}_sm{'-'.join(cuda_arches())}".replace("+", "_")
    return Path(base) / tag


def build(verbose: bool = False) -> str:
    """Compile csrc/ (or reuse the cached build) and register torch.ops.intl_cuda.*; returns where from.

    A no-op when the ops are already registered (e.g. by intl_ops._C). Takes ~1-3 minutes the first time.
    """
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    reason = toolkit_reason()
    if reason is not None:
        raise RuntimeError(f"cannot build the intl CUDA extension: {reason}")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home()  # torch guesses /usr/local from nvcc's PATH
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    bindir = os.path.dirname(sys.executable)  # ninja sits next to the interpreter of a non-activated venv
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    lib = cpp_extension.load(name="intl_ops_cuda", sources=[str(s) for s in SOURCES], extra_cflags=host_flags(),
                             extra_cuda_cflags=nvcc_flags(), extra_include_paths=[str(CSRC)],
                             build_directory=str(out), is_python_module=False, verbose=verbose)
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

    def bwd(wbar, S, tr, Ps, Pp, iters, n_obs):
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
def _inv_sqrt(tr: Tensor) -> Tensor:
    pos = tr > 0
    return torch.where(pos, torch.where(pos, tr, torch.ones_like(tr)).rsqrt(), torch.zeros_like(tr))


def _ns_fwd_torch(sigma: Tensor, iters: int):
    """Newton-Schulz forward for C > 256 with torch products (as intl_ops.reference); v comes later."""
    tr = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    S = sigma * torch.where(tr > 0, 1.0 / torch.where(tr > 0, tr, torch.ones_like(tr)), torch.zeros_like(tr))[:, None, None]
    B, C = S.shape[0], S.shape[-1]
    eye = torch.eye(C, dtype=S.dtype, device=S.device).expand_as(S)
    Ps, Pp = S.new_empty(B, iters, C, C), S.new_empty(B, max(iters - 1, 0), 2, C, C)
    P = eye
    if iters >= 1:
        P = 1.5 * eye - 0.5 * S
        Ps[:, 0] = P
    for k in range(1, iters):
        P2 = P @ P
        P3 = P2 @ P
        Pp[:, k - 1, 0], Pp[:, k - 1, 1] = P2, P3
        P = torch.baddbmm(P, P3, S, beta=1.5, alpha=-0.5)
        Ps[:, k] = P
    return S, tr, Ps, Pp


def iternorm_fwd(x: Tensor, iters: int, axis: int) -> IterNormSaved:
    if x.dtype == torch.float64:
        return reference.iternorm_fwd(x, iters, axis)
    batch, (m, d) = x.shape[:-2], x.shape[-2:]
    x3 = x.reshape(-1, m, d)
    a = as_observations(x3, axis)  # (B, N, C) strided view, no copy
    B, N, C = a.shape
    mean = a.mean(dim=1, dtype=torch.float32)
    sigma = _K.centered_gram(a, mean)
    if C <= NS_MAX_C:
        S, tr, Ps, Pp, v = _K.ns_fwd(sigma, iters)
    else:
        S, tr, Ps, Pp = _ns_fwd_torch(sigma, iters)
    P_T = Ps[:, -1] if iters >= 1 else torch.eye(C, dtype=S.dtype, device=S.device).expand_as(S)
    W = P_T * _inv_sqrt(tr)[:, None, None]
    if C <= NS_MAX_C:
        y = _K.centered_matmul(a, mean, W, axis == 0)  # (B, m, d) in x's dtype
    else:  # N < C is common here: the variances from y cost less than another C x C x C product
        y_obs = (a.float() - mean[:, None, :]) @ W
        v = y_obs.var(dim=1, correction=1)
        y = (y_obs.mT if axis == 0 else y_obs).to(x.dtype)
    return IterNormSaved(y.contiguous().reshape(x.shape), mean.reshape(*batch, C), S.reshape(*batch, C, C),
                         tr.reshape(batch), Ps.reshape(*batch, *Ps.shape[1:]), Pp.reshape(*batch, *Pp.shape[1:]),
                         v.reshape(*batch, C))


def iternorm_bwd(grad_y: Tensor, grad_v: Tensor, y: Tensor, x: Tensor, mean: Tensor, S: Tensor, tr: Tensor,
                 Ps: Tensor, Pp: Tensor, iters: int, axis: int) -> Tensor:
    C = S.shape[-1]
    if x.dtype == torch.float64 or C > NS_MAX_C:
        return reference.iternorm_bwd(grad_y, grad_v, y, x, mean, S, tr, Ps, Pp, iters, axis)
    m, d = x.shape[-2:]
    a = as_observations(x.reshape(-1, m, d), axis)
    B, N, _ = a.shape
    mean, S, tr = mean.reshape(B, C), S.reshape(B, C, C), tr.reshape(B)
    Ps, Pp = Ps.reshape(B, *Ps.shape[-3:]), Pp.reshape(B, *Pp.shape[-4:])
    yo = as_observations(y.reshape(-1, m, d), axis).float()
    gy = as_observations(grad_y.reshape(-1, m, d), axis).float()
    # Ybar = gy + 2 gv_j (y_ij - mean_j) / (N - 1) (the trace-loss route), centred over the observations:
    # then Ac^T Ybar is unchanged and Ybar W^T + Ac M already has zero column means (Abar needs no pass).
    coef = (2.0 / (N - 1)) * grad_v.reshape(B, 1, C)
    ybar = (gy - gy.mean(dim=1, keepdim=True)) + coef * (yo - yo.mean(dim=1, keepdim=True))
    P_T = Ps[:, -1] if iters >= 1 else torch.eye(C, dtype=S.dtype, device=S.device).expand_as(S)
    W = P_T * _inv_sqrt(tr)[:, None, None]
    wbar = _K.centered_tmatmul(a, mean, ybar)
    M = _K.ns_bwd(wbar, S, tr, Ps, Pp, iters, N)
    return _K.grad_input(ybar, W, a, mean, M, axis == 0).reshape(x.shape)


_try_load()
