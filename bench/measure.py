"""One row: time one (case, provider) in one mode, its peak memory and its roofline columns.
Shared by the grid runner (bench/runner.py) and the foundation benchmark (bench/foundation_cpu.py)."""
from __future__ import annotations

import itertools
import math
import time

import torch

from . import providers as P
from . import roofline, timing
from .providers import Case


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mode_calls(fwd, xs: list[torch.Tensor], mode: str):
    """The zero-argument call that `mode` times, for the forward `fwd` on views `xs`."""
    if mode not in P.MODES:
        raise ValueError(f"mode must be one of {P.MODES}, got {mode!r}")
    out = fwd(xs)  # a `compiled` forward compiles here
    dy = None if out.dim() == 0 else torch.randn_like(out)  # scalars: backward() of the loss itself
    if mode == "forward":
        return lambda: fwd(xs)
    if mode == "backward":
        return lambda: out.backward(dy, retain_graph=True)
    return lambda: fwd(xs).backward(dy)


def rotation_copies(case: Case, device: torch.device) -> int:
    """How many input copies to cycle through on a GPU so they cannot all sit in L2 (2x L2 in all)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    nbytes = case.k * case.m * case.d * torch.tensor([], dtype=P.DTYPES[case.dtype]).element_size()
    return int(min(8, max(1, math.ceil(2 * l2 / nbytes))))


def measure(case: Case, provider: str, fwd, device: torch.device, opts, peaks: dict) -> dict:
    """Time one (case, provider) and fill the measurement columns of its row. `opts` holds target_s,
    min_reps (CPU), warmup_ms, rep_ms, graph_below_ms (GPU), tf32 and memory."""
    row: dict = {"status": "ok"}
    xs = P.make_inputs(case, device, seed=0)
    copies = [xs]
    if case.mode != "backward":  # backward reuses one recorded graph: L2 is flushed between calls instead
        copies += [P.make_inputs(case, device, seed=i) for i in range(1, rotation_copies(case, device))]
    calls = [mode_calls(fwd, c, case.mode) for c in copies]
    leaves = [t for c in copies for t in c]
    cycle = itertools.cycle(calls)
    fn = (lambda: next(cycle)()) if len(calls) > 1 else calls[0]

    t0 = time.perf_counter()
    timing.clear_grads(leaves)
    fn()
    sync(device)
    row["first_call_s"] = round(time.perf_counter() - t0, 4)  # the first call (mode_calls ran one forward before it)
    if device.type == "cuda":
        t = timing.time_gpu(fn, leaves, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms)
        if t.median_ms < opts.graph_below_ms:  # launch-bound: what a CUDA graph would give
            try:
                row["graph_ms"] = timing.time_cuda_graph(calls, leaves).median_ms
            except Exception as exc:  # capture is not supported by every provider
                row["graph_status"] = f"graph capture failed: {type(exc).__name__}: {exc}"[:200]
                torch.cuda.synchronize()
    else:
        t = timing.time_cpu(fn, leaves, target_s=opts.target_s, min_reps=opts.min_reps)
    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)
    if opts.memory:
        if device.type == "cuda":
            peak = timing.peak_memory_gpu(calls[0], xs)
        else:
            peak = timing.peak_memory_cpu(calls[0], xs)
        row["peak_mb"] = None if peak is None else peak / 2**20

    method = provider if case.op == "whiten" else None
    w = roofline.work(case.op, case.mode, case.m, case.d, case.axis, case.iters, case.k, case.dtype, method)
    row["gflop"] = w.flops / 1e9
    row["min_mb"] = w.bytes / 2**20
    floor = roofline.floor_seconds(w, peaks, case.dtype, tf32=opts.tf32)
    if floor is not None:
        row["floor_ms"] = floor * 1e3
        row["x_floor"] = t.median_ms / row["floor_ms"]
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup = baseline median / row median, within one case and mode (rows of one case)."""
    base = {r["mode"]: r.get("median_ms") for r in rows if r["provider"] == P.baseline(r["op"])}
    for r in rows:
        b = base.get(r["mode"])
        if b and r.get("median_ms"):
            r["speedup"] = b / r["median_ms"]
