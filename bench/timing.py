"""Timers and peak-memory probes, GPU and CPU, behind one interface.

GPU: triton.testing.do_bench (CUDA events; it flushes L2 before every call) median and p20/p80;
     CUDA-graph replay timing for launch-bound rows; peak = torch.cuda.max_memory_allocated delta.
CPU: time.perf_counter around each call (monotonic), median and p20/p80 of repeated calls;
     peak = the high-water mark of torch's CPU allocator during one call, read from torch.profiler's
     allocation events (profile_memory=True). tracemalloc cannot be used: torch's CPU tensors are
     allocated in C++ and tracemalloc only sees Python's allocator. RSS is not used either: glibc
     keeps freed blocks, so a second call's RSS growth says little.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (as numpy's default) of an already sorted list."""
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Timing:
    s = sorted(times_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s))


def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_cpu(fn: Callable, grad_to_none: Sequence[torch.Tensor] = (), *, target_s: float = 0.5,
             min_reps: int = 5, max_reps: int = 200, warmup: int = 2) -> Timing:
    """Median / p20 / p80 of `fn` over repeated calls; grads are cleared outside the timed region.
    The number of repetitions is chosen from the warm-up time so a row takes about target_s."""
    t_warm = 0.0
    for _ in range(warmup):
        clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        t_warm = time.perf_counter() - t0  # the last warm-up call: compilation is behind us
    reps = int(min(max_reps, max(min_reps, target_s / max(t_warm, 1e-6))))
    times = []
    for _ in range(reps):
        clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def time_gpu(fn: Callable, grad_to_none: Sequence[torch.Tensor] = (), *, warmup_ms: int = 25,
             rep_ms: int = 100) -> Timing:
    """triton.testing.do_bench: CUDA events around each call after warm-up, L2 flushed in between."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none),
                                            quantiles=list(QUANTILES))
    return Timing(med, p20, p80, -1)


def time_cuda_graph(calls: Sequence[Callable], grad_to_none: Sequence[torch.Tensor] = (), *,
                    replays: int = 20, blocks: int = 10) -> Timing:
    """Per-call time of `calls` (the same op on rotated input copies) captured in one CUDA graph:
    no launch overhead, no L2 flush (rotation keeps the inputs from being L2-resident).
    Each of `blocks` measurements replays the graph `replays` times between two CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as torch.cuda.graph requires
        for _ in range(2):
            clear_grads(grad_to_none)
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    clear_grads(grad_to_none)  # the captured backward allocates .grad once; replays overwrite it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(blocks):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(calls)))
    del graph
    return summarize(times)


def peak_memory_gpu(fn: Callable, grad_to_none: Sequence[torch.Tensor] = ()) -> int:
    """Bytes allocated at the high-water mark of one call, above what was allocated before it."""
    clear_grads(grad_to_none)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def peak_memory_cpu(fn: Callable, grad_to_none: Sequence[torch.Tensor] = ()) -> int | None:
    """High-water mark of torch's CPU allocations during one call, above the level before it.

    torch.profiler(profile_memory=True) records every allocation and free of the CPU allocator
    with its size; the running sum of those, in time order, peaks at the answer. Frees of blocks
    allocated before the call are not reported by the profiler, so the result can only err high.
    Returns None when this torch's profiler does not expose allocation events."""
    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    clear_grads(grad_to_none)
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size))
    events.sort()
    level = peak = 0
    for _, size in events:
        level += size
        peak = max(peak, level)
    return int(peak)
