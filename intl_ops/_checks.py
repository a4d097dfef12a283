"""Argument validation with errors that name the argument, and the opt-in non-finite check."""
from __future__ import annotations

import operator
import os

import torch
from torch import Tensor

_CHECK_FINITE: bool | None = None  # None: follow the INTL_OPS_CHECK environment variable


def set_check_finite(enabled: bool | None) -> None:
    """Turn the non-finite input check on/off (None: follow env INTL_OPS_CHECK=1). It syncs the device."""
    global _CHECK_FINITE
    _CHECK_FINITE = enabled


def check_finite_enabled() -> bool:
    if _CHECK_FINITE is not None:
        return _CHECK_FINITE
    return os.environ.get("INTL_OPS_CHECK", "0") not in ("", "0", "false", "False")


def check_finite(x: Tensor, name: str) -> None:
    if check_finite_enabled() and not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def check_iters(iters) -> int:
    if isinstance(iters, bool):
        raise TypeError(f"iters must be a non-negative int, got {iters!r}")
    try:
        iters = operator.index(iters)
    except TypeError:
        raise TypeError(f"iters must be a non-negative int, got {iters!r}") from None
    if iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters}")
    return iters


def check_axis(axis) -> int:
    if isinstance(axis, bool) or axis not in (0, 1):
        raise ValueError(f"axis must be 0 (decorrelate the m samples) or 1 (decorrelate the d features), got {axis!r}")
    return int(axis)


def check_float_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {x.dtype}")


def check_matrix(x, name: str, axis: int, batched: bool = False, count_obs: bool = True) -> None:
    """x is a floating (m, d) tensor ((K, m, d) if batched) with >= 2 observations along `axis`'s reduced dim
    (count_obs=False skips that count, for a rank's share of samples before they are gathered)."""
    check_float_tensor(x, name)
    want = 3 if batched else 2
    if x.dim() != want:
        layout = "(K, m, d)" if batched else "(m samples, d features)"
        raise ValueError(f"{name} must be {want}-D {layout}, got shape {tuple(x.shape)}")
    m, d = x.shape[-2], x.shape[-1]
    n_obs, what = (d, "d features") if axis == 0 else (m, "m samples")
    if count_obs and n_obs < 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: axis={axis} averages over the {what}, "
                         f"which needs at least 2 of them, got {n_obs}")
    if min(m, d) < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
