"""Backend registry: which implementations of the `intl` ops exist, which can run here, and "auto".

A backend is a module that provides some of the functions of `intl_ops.reference`
(iternorm_fwd/iternorm_bwd, trace_loss_fwd/bwd, nmse_fwd/bwd) with the same signatures and the
same saved-tensor layout, plus `unavailable_reason(device) -> str | None`. A function a backend
does not provide falls back to the reference. Modules are imported lazily, so importing intl_ops
never fails because a backend is missing; `available_backends()` says why one cannot run.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

BACKEND_MODULES = {
    "reference": "intl_ops.reference",
    "triton": "intl_ops.backend_triton",
    "cuda": "intl_ops.backend_cuda",
}
BACKEND_NAMES = ("auto", *BACKEND_MODULES)
# What "auto" picks on a CUDA device, fastest first (measured in bench/, see README).
AUTO_ORDER_CUDA = ("triton", "reference")


@functools.cache
def _load(name: str) -> ModuleType | str:
    """The backend module, or the reason it cannot be imported."""
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except Exception as exc:  # a missing optional dependency or extension
        return f"{type(exc).__name__}: {exc}"


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None if backend `name` can run on `device`, else a human-readable reason."""
    mod = _load(name)
    if isinstance(mod, str):
        return mod
    check = getattr(mod, "unavailable_reason", None)
    return check(torch.device(device)) if check is not None else None


def available_backends(device: torch.device | str | None = None) -> dict[str, str]:
    """{backend: "available" or why not} for `device` (default: cuda if present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: unavailable_reason(name, device) or "available" for name in BACKEND_MODULES}


@torch.compiler.assume_constant_result  # decided once at trace time: no import machinery in the graph
def resolve(backend: str, device: torch.device) -> str:
    """Validate a backend name and turn "auto" into a concrete backend usable on `device`."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            for name in AUTO_ORDER_CUDA:
                if unavailable_reason(name, device) is None:
                    return name
        return "reference"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")
    return backend


def impl(backend: str, fn: str):
    """The function `fn` of `backend`, or the reference's where the backend does not provide it."""
    mod = _load(backend)
    if isinstance(mod, str):
        raise RuntimeError(f"backend={backend!r} is unavailable: {mod}")
    found = getattr(mod, fn, None)
    if found is None:
        found = getattr(importlib.import_module("intl_ops.reference"), fn)
    return found


def set_dot_precision(mode: str) -> None:
    """Matmul precision of the Triton kernels (every product accumulates in fp32):
    "auto" (default): tensor cores at fp32 accuracy, fp32 operands as tf32x3 (tf32 when torch allows
    tf32 matmuls), fp16/bf16 input tiles in their own dtype; "tf32x3"; "tf32"; "ieee" (exact fp32,
    no tensor cores). Also settable with the environment variable INTL_OPS_DOT_PRECISION. The mode is
    validated by kernels/_common.py (ValueError naming the modes)."""
    mod = _load("triton")
    if isinstance(mod, str):
        raise RuntimeError(f"the Triton backend is unavailable: {mod}")
    mod.set_dot_precision(mode)
