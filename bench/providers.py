"""Benchmark cases, providers and one setup function per (op, provider).

A setup function takes a Case and returns the op's forward as a function of the input views
(a list of K (m, d) tensors) that returns what a user would call backward on: y for iternorm /
whiten, the scalar loss for trace_loss / intl_loss. The runner builds the forward / backward /
full modes from it, so every provider is timed by the same code.

Providers (discovered, never imported directly: new backends appear through intl_ops.available_backends):
    eager      intl_ops.literal: the public reference code (matrix_power + baddbmm, autograd)
    eager-amp  the same under torch.autocast(bf16), as the reference training script runs it
    compiled   torch.compile(eager)
    reference  intl_ops with backend="reference" (pure PyTorch, analytic backward)
    triton     intl_ops with backend="triton"  (when available on the device)
    cuda       intl_ops with backend="cuda"    (when available on the device)
For op "whiten" (issue 7) the providers are the methods of intl_ops.whiten: iternorm, zca, cholesky.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

import intl_ops
from intl_ops import literal

OPS = ("iternorm", "trace_loss", "intl_loss", "whiten")
MODES = ("forward", "backward", "full")
PROVIDERS = ("eager", "eager-amp", "compiled", "reference", "triton", "cuda")
WHITEN_PROVIDERS = ("iternorm", "zca", "cholesky")
BACKEND_PROVIDERS = ("reference", "triton", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

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


def baseline(op: str) -> str:
    return BASELINE.get(op, DEFAULT_BASELINE)


def providers_for(op: str) -> tuple[str, ...]:
    return WHITEN_PROVIDERS if op == "whiten" else PROVIDERS


# ------------------------------------------------------------------ discovery
def provider_status(device: torch.device, allow_interpreter: bool = False) -> dict[str, str | None]:
    """{provider: None if it can run on `device`, else why not} for every provider name."""
    device = torch.device(device)
    status: dict[str, str | None] = {"eager": None, "compiled": None, "reference": None}
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        status["eager-amp"] = "this GPU has no bf16 support"
    else:
        status["eager-amp"] = None  # on CPU autocast runs bf16 matmuls too
    backends = intl_ops.available_backends(device)
    for name in ("triton", "cuda"):
        reason = backends.get(name, "not registered in intl_ops.backends")
        if reason == "available":
            reason = None
        if reason is None and device.type == "cpu" and name == "triton" and not allow_interpreter:
            reason = "Triton on CPU runs under the interpreter: its timings mean nothing"
        status[name] = reason
    whiten = getattr(intl_ops, "whiten", None)
    for method in WHITEN_PROVIDERS:
        status[f"whiten:{method}"] = None if whiten is not None else "intl_ops.whiten is not available (issue 7)"
    return status


def runnable(op: str, provider: str, status: dict[str, str | None]) -> str | None:
    """None if (op, provider) can run, else the reason."""
    key = f"whiten:{provider}" if op == "whiten" else provider
    if key not in status:
        return f"unknown provider {provider!r} for op {op!r}"
    return status[key]


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


# intl_ops backends: the public API with a concrete backend.
def _backend_setups(backend: str):
    @setup("iternorm", backend)
    def _(c: Case):
        return lambda xs: intl_ops.iternorm(xs[0], c.iters, c.axis, backend=backend)

    @setup("trace_loss", backend)
    def _(c: Case):
        return lambda xs: intl_ops.trace_loss(xs[0], c.axis, backend=backend)

    @setup("intl_loss", backend)
    def _(c: Case):
        return lambda xs: intl_ops.intl_loss(xs, c.iters, c.axis, backend=backend)


for _b in BACKEND_PROVIDERS:
    _backend_setups(_b)


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


# whiten (issue 7): the methods of intl_ops.whiten, looked up at call time.
def _whiten_setup(method: str):
    @setup("whiten", method)
    def _(c: Case):
        whiten = getattr(intl_ops, "whiten")
        return lambda xs: whiten(xs[0], method=method, axis=c.axis, iters=c.iters)


for _m in WHITEN_PROVIDERS:
    _whiten_setup(_m)


def get_forward(case: Case, provider: str) -> Callable:
    try:
        factory = SETUPS[(case.op, provider)]
    except KeyError:
        raise ValueError(f"no setup for op {case.op!r} and provider {provider!r}") from None
    return factory(case)


def raise_dynamo_limits() -> None:
    """The full grid compiles one graph per shape; dynamo's default of 8 per function is too few."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
