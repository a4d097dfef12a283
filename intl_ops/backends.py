"""Backend registry: which implementations of the `intl` ops exist, what each supports, and "auto".

A backend is one module that provides some of the op functions of `intl_ops.reference` (the names
in OPS), with the same signatures and the saved-tensor layout of docs/math.md §8, and may define
    unavailable_reason(device) -> str | None   why it cannot run on a device at all (default: it can)
    supports(op, shape, dtype, device) -> str | None
                                               why it does not run `op` for such inputs (default: it
                                               runs every op function it defines)
`shape` is the (*, N, C) shape of the observations-by-variables matrix A of docs/math.md §2 (an
(m, d) input is (d, m) for axis=0 and (m, d) for axis=1); for nmse it is the (*, m, d) input, for the
intl_head functions the (K, m, d) views (dtype: theirs; a target of another dtype is the backend's to read).

Adding a backend is one module plus one line in REGISTRY (or `register()` from outside). Every
call picks its implementation per op: the named backend where it supports the call, else the
reference (same device, same math); "auto" tries the backends marked auto for the device type, in
registry order.
Modules are imported lazily, so importing intl_ops never fails because a backend is missing.
"""
from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import torch


class Entry(NamedTuple):
    module: str
    auto: tuple[str, ...] = ()  # device types on which backend="auto" considers it (in registry order)


# "auto" tries these in order; the reference runs whatever no other backend takes. triton is auto on
# CUDA only (on CPU it needs the interpreter: a test tool, not a fast path); cuda is opt-in: it is faster
# than triton only on some shapes (bench/README).
REGISTRY: dict[str, Entry] = {
    "triton": Entry("intl_ops.backend_triton", auto=("cuda",)),
    "cuda": Entry("intl_ops.backend_cuda"),
    "reference": Entry("intl_ops.reference"),
}
FALLBACK = "reference"
OPS = ("iternorm_fwd", "iternorm_bwd", "trace_loss_fwd", "trace_loss_bwd", "nmse_fwd", "nmse_bwd",
       "spectral_transform_fwd", "spectral_transform_bwd", "intl_head_fwd", "intl_head_bwd")


def register(name: str, module: str, *, auto: tuple[str, ...] = ()) -> None:
    """Add (or replace) backend `name`, implemented by the module at import path `module`; `auto`: the
    device types ("cuda", "cpu", ...) on which backend="auto" considers it, after the earlier entries."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name must be a non-empty string other than 'auto', got {name!r}")
    if isinstance(auto, str) or not all(isinstance(t, str) for t in auto):
        raise TypeError(f"auto must be a tuple of device types like ('cuda',), got {auto!r}")
    REGISTRY[name] = Entry(module, tuple(auto))
    _load.cache_clear()


def unregister(name: str) -> None:
    if name == FALLBACK:
        raise ValueError(f"the {FALLBACK!r} backend cannot be removed: it runs what no other backend supports")
    REGISTRY.pop(name, None)
    _load.cache_clear()


def registered() -> tuple[str, ...]:
    """Every backend name, in the order "auto" considers them."""
    return tuple(REGISTRY)


def names() -> tuple[str, ...]:
    """Every value the `backend=` arguments accept."""
    return ("auto", *REGISTRY)


@functools.cache
def _load(name: str):
    """The backend module, or the reason it cannot be imported (a str)."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {tuple(REGISTRY)}, got {name!r}")
    try:
        return importlib.import_module(REGISTRY[name].module)
    except Exception as exc:  # a missing optional dependency or extension
        return f"{type(exc).__name__}: {exc}"


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """None if backend `name` can run on `device`, else a human-readable reason."""
    mod = _load(name)
    if isinstance(mod, str):
        return mod
    check = getattr(mod, "unavailable_reason", None)
    return check(torch.device(device)) if check is not None else None


def supports(name: str, op: str, shape, dtype: torch.dtype, device: torch.device | str) -> str | None:
    """None if backend `name` runs `op` for inputs of this shape, dtype and device, else why not."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    reason = unavailable_reason(name, device)
    if reason is not None:
        return reason
    mod = _load(name)
    if not callable(getattr(mod, op, None)):
        return f"backend {name!r} does not provide {op}"
    check = getattr(mod, "supports", None)
    return check(op, tuple(shape), dtype, torch.device(device)) if check is not None else None


def available_backends(device: torch.device | str | None = None) -> dict[str, str]:
    """{backend: "available" or why not} for `device` (default: cuda if present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: unavailable_reason(name, device) or "available" for name in REGISTRY}


@torch.compiler.assume_constant_result  # decided once at trace time: no import machinery in the graph
def resolve(backend: str, device: torch.device) -> str:
    """Validate a `backend=` argument for `device`: an unknown name is a ValueError, a named backend
    that cannot run there a RuntimeError. Returns the name, "auto" turned into the first auto candidate
    available on the device (the one that runs the iternorm ops where it supports them)."""
    if backend == "auto":
        for name, entry in REGISTRY.items():
            if device.type in entry.auto and unavailable_reason(name, device) is None:
                return name
        return FALLBACK
    _require(backend, device)
    return backend


def _require(backend: str, device: torch.device) -> None:
    """A named backend must be registered (ValueError) and able to run on the device (RuntimeError)."""
    if not isinstance(backend, str) or backend not in REGISTRY:
        raise ValueError(f"backend must be one of {names()}, got {backend!r}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")


def select(backend: str, op: str, shape, dtype: torch.dtype, device: torch.device) -> str:
    """The backend that runs this call: `backend` where it supports it, else the reference; for "auto"
    the first auto candidate that supports it."""
    if backend == "auto":
        for name, entry in REGISTRY.items():
            if device.type in entry.auto and supports(name, op, shape, dtype, device) is None:
                return name
        return FALLBACK
    _require(backend, device)
    return backend if supports(backend, op, shape, dtype, device) is None else FALLBACK


def impl(backend: str, op: str, shape, dtype: torch.dtype, device: torch.device):
    """The function that runs `op` for this call (see select)."""
    return getattr(_load(select(backend, op, shape, dtype, device)), op)


def set_dot_precision(mode: str) -> None:
    """Matmul precision of the Triton kernels (every product accumulates in fp32):
    "auto" (default): tensor cores at fp32 accuracy, fp32 operands as tf32x3 (tf32 when torch allows
    tf32 matmuls), fp16/bf16 input tiles in their own dtype; "tf32x3"; "tf32"; "ieee" (exact fp32,
    no tensor cores). Also settable with the environment variable INTL_OPS_DOT_PRECISION. The mode is
    validated by intl_ops/kernels/_common.py (ValueError naming the modes)."""
    mod = _load("triton")
    if isinstance(mod, str):
        raise RuntimeError(f"the Triton backend is unavailable: {mod}")
    mod.set_dot_precision(mode)
