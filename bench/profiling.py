"""--profile: what one call launches, per provider (torch.profiler).

CUDA: the number of device activities (kernels, memcpy, memset) and their summed device time.
CPU: the number of leaf torch ops (aten ops that call no other aten op: the ones that compute,
the CPU analogue of kernels) and their summed self CPU time. Optionally a Chrome trace per call
(open in chrome://tracing or https://ui.perfetto.dev).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .timing import clear_grads


def _is_op(name: str) -> bool:
    return "::" in name  # aten::mm, intl::iternorm_fwd, ...


def summarize_events(events, device_type: str) -> dict:
    """{"launches": count, "device_ms": summed time} from a profiler's FunctionEvents."""
    if device_type == "cuda":
        acts = [e for e in events if e.device_type == DeviceType.CUDA]
        return {"launches": len(acts), "device_ms": sum(e.time_range.elapsed_us() for e in acts) / 1e3,
                "what": "CUDA kernels + memcpy/memset"}
    leaves = [e for e in events if e.device_type == DeviceType.CPU and _is_op(e.name)
              and not any(_is_op(c.name) for c in e.cpu_children)]
    return {"launches": len(leaves), "device_ms": sum(e.self_cpu_time_total for e in leaves) / 1e3,
            "what": "leaf CPU ops (self time)"}


def profile_call(fn: Callable, device: torch.device, grad_to_none: Sequence[torch.Tensor] = (),
                 trace_path: Path | None = None) -> dict:
    for _ in range(2):  # warm up: compilation and autotuning stay out of the profile
        clear_grads(grad_to_none)
        fn()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    clear_grads(grad_to_none)
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    out = summarize_events(prof.events(), device.type)
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
        out["trace"] = str(trace_path)
    return out
