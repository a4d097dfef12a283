"""Benchmark cases, providers and one setup function per (op, provider).

A setup function takes a Case and returns the op's forward as a function of the input views
(a list of K (m, d) tensors) that returns what a user would call backward on: y for iternorm /
whiten, the scalar loss for trace_loss / intl_loss. bench/measure.py builds the forward / backward /
full modes from it, so every provider is timed by the same code.

Providers:
    eager      intl_ops.literal: the public reference code (matrix_power + baddbmm, autograd)
    eager-amp  the same under torch.autocast(bf16), as the reference training script runs it
    compiled   torch.compile(eager)
    and one per backend of intl_ops.backends.registered() (reference, triton, cuda, and any backend
    registered later): intl_ops with backend=<name>. Nothing here names a backend: a new one is
    benchmarked as soon as it is registered. A backend is timed only where it runs the case itself
    (intl_ops.backends.supports for the case's main op; elsewhere intl_ops would quietly run the
    reference in its place).
For op "whiten" (the whitening comparison) the providers are the methods of intl_ops.whiten:
iternorm, zca, cholesky.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

import intl_ops
from intl_ops import backends, literal

OPS = ("iternorm", "trace_loss", "intl_loss", "whiten")
MODES = ("forward", "backward", "full")
FIXED_PROVIDERS = ("eager", "eager-amp", "compiled")
WHITEN_PROVIDERS = ("iternorm", "zca", "cholesky")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# The backend op whose support decides whether a backend provider runs a case.
BACKEND_OP = {"iternorm": "iternorm_fwd", "intl_loss": "iternorm_fwd", "trace_loss": "trace_loss_fwd"}

# Backends whose timings on CPU mean nothing unless asked for (--allow-interpreter).
INTERPRETED_ON_CPU = {"triton": "Triton on CPU runs under the interpreter: its timings mean nothing"}

# The provider every other one is compared with ("speedup" column).
BASELINE = {"whiten": "zca"}
DEFAULT_BASELINE = "eager"


@dataclass(frozen=True)
class Case:
    op: str
    m: int
    d: int
    axis: int = 0
    iters: int = 4
    k: int = 1          # number of views (intl_loss: 2, or 6 for multi-crop)
    dtype: str = "fp32"
    mode: str = "full"

    def label(self) -> str:
        views = f" K={self.k}" if self.op == "intl_loss" else ""
        return f"{self.op} {self.m}x{self.d} ax{self.axis} T{self.iters}{views} {self.dtype}"

    def with_mode(self, mode: str) -> "Case":
        return replace(self, mode=mode)

    def as_dict(self) -> dict:
        return asdict(self)

    def observations_shape(self) -> tuple[int, ...]:
        """The (*, N, C) shape of the matrix A the backends see: (d, m) for axis=0, (m, d) for
        axis=1; intl_loss stacks its K views, (K, N, C)."""
        nc = (self.d, self.m) if self.axis == 0 else (self.m, self.d)
        return (self.k, *nc) if self.op == "intl_loss" else nc


def baseline(op: str) -> str:
    return BASELINE.get(op, DEFAULT_BASELINE)


def backend_providers() -> tuple[str, ...]:
    """Every registered intl_ops backend, in the registry's order."""
    return backends.registered()


def providers_for(op: str) -> tuple[str, ...]:
    return WHITEN_PROVIDERS if op == "whiten" else FIXED_PROVIDERS + backend_providers()


def all_providers() -> tuple[str, ...]:
    return FIXED_PROVIDERS + backend_providers() + WHITEN_PROVIDERS


# ------------------------------------------------------------------ discovery
def provider_status(device: torch.device, allow_interpreter: bool = False) -> dict[str, str | None]:
    """{provider: None if it can run on `device`, else why not} for every provider of every op
    (whiten's methods as "whiten:<method>")."""
    device = torch.device(device)
    status: dict[str, str | None] = {"eager": None, "compiled": None}
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        status["eager-amp"] = "this GPU has no bf16 support"
    else:
        status["eager-amp"] = None  # on CPU autocast runs bf16 matmuls too
    available = intl_ops.available_backends(device)
    for name in backend_providers():
        reason = available.get(name, "not in intl_ops.available_backends")
        if reason == "available":
            reason = None
        if reason is None and device.type == "cpu" and name in INTERPRETED_ON_CPU and not allow_interpreter:
            reason = INTERPRETED_ON_CPU[name]
        status[name] = reason
    for method in WHITEN_PROVIDERS:
        status[f"whiten:{method}"] = None
    return status


def runnable(case: Case, provider: str, status: dict[str, str | None], device: torch.device) -> str | None:
    """None if `provider` can run `case` on `device`, else the reason: the provider's status, or for a
    backend what intl_ops.backends.supports says of the case's main op at its shape and dtype."""
    key = f"whiten:{provider}" if case.op == "whiten" else provider
    if key not in status:
        return f"unknown provider {provider!r} for op {case.op!r}"
    if status[key] is not None or provider not in backend_providers() or case.op == "whiten":
        return status[key]
    return backends.supports(provider, BACKEND_OP[case.op], case.observations_shape(), DTYPES[case.dtype],
                             torch.device(device))


# ------------------------------------------------------------------ inputs
def make_inputs(case: Case, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """K fresh random (m, d) views that require grad (a per-view offset so the mean matters)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    views = []
    for _ in range(case.k):
        x = torch.randn(case.m, case.d, generator=g) + 0.1 * torch.randn(1, case.d, generator=g)
        views.append(x.to(device=device, dtype=DTYPES[case.dtype]).requires_grad_(True))
    return views


# ------------------------------------------------------------------ setup functions
SETUPS: dict[tuple[str, str], Callable[[Case], Callable]] = {}


def setup(op: str, provider: str):
    def register(fn):
        SETUPS[(op, provider)] = fn
        return fn
    return register


# eager: the literal reference code, op by op.
@setup("iternorm", "eager")
def _(c: Case):
    return lambda xs: literal.iternorm(xs[0], c.iters, c.axis)


@setup("trace_loss", "eager")
def _(c: Case):
    return lambda xs: literal.trace_loss(xs[0], c.axis)


@setup("intl_loss", "eager")
def _(c: Case):
    return lambda xs: literal.intl_loss(xs, c.iters, c.axis)


# eager-amp and compiled: wrappers of the eager setup.
def _eager_amp(op: str):
    @setup(op, "eager-amp")
    def _(c: Case):
        f = SETUPS[(op, "eager")](c)

        def run(xs):
            with torch.autocast(xs[0].device.type, dtype=torch.bfloat16):
                return f(xs)
        return run


_COMPILED: dict[tuple, Callable] = {}


def _compiled(op: str):
    @setup(op, "compiled")
    def _(c: Case):
        # One torch.compile wrapper per (op, iters, axis, k): shapes specialise inside dynamo's cache.
        key = (op, c.iters, c.axis, c.k)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(SETUPS[(op, "eager")](c), dynamic=False)
        return _COMPILED[key]


for _op in ("iternorm", "trace_loss", "intl_loss"):
    _eager_amp(_op)
    _compiled(_op)


# whiten (the whitening comparison): the methods of intl_ops.whiten.
def _whiten_setup(method: str):
    @setup("whiten", method)
    def _(c: Case):
        return lambda xs: intl_ops.whiten(xs[0], method=method, axis=c.axis, iters=c.iters)


for _m in WHITEN_PROVIDERS:
    _whiten_setup(_m)


# intl_ops backends: the public API with backend=<name>, for every registered name.
def _backend_forward(c: Case, backend: str) -> Callable:
    if c.op == "iternorm":
        return lambda xs: intl_ops.iternorm(xs[0], c.iters, c.axis, backend=backend)
    if c.op == "trace_loss":
        return lambda xs: intl_ops.trace_loss(xs[0], c.axis, backend=backend)
    return lambda xs: intl_ops.intl_loss(xs, c.iters, c.axis, backend=backend)


def get_forward(case: Case, provider: str) -> Callable:
    if (case.op, provider) in SETUPS:
        return SETUPS[(case.op, provider)](case)
    if case.op in BACKEND_OP and provider in backend_providers():
        return _backend_forward(case, provider)
    raise ValueError(f"no setup for op {case.op!r} and provider {provider!r}")


def raise_dynamo_limits() -> None:
    """The full grid compiles one graph per shape; dynamo's default of 8 per function is too few."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
