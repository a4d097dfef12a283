"""Ahead-of-time compile, for sm_90 and without a GPU, of every Triton launch the triton backend makes.

Why: without a GPU, CI runs the Triton kernels only under the interpreter, which never runs Triton's
compiler. A kernel that does not compile for Hopper, needs too much shared memory, or spills registers
would first show up on the (rarely lent) GPU machine. This finds it on any machine, in minutes.

How, with nothing hard-coded about the kernels (they change often):
1. Enumerate. With TRITON_INTERPRET unset (so the kernels are JITFunctions and the launchers pick their
   GPU block sizes), `JITFunction.run` is patched to record each launch instead of running it, and the
   host functions of intl_ops.backend_triton run on CPU tensors of representative shapes, dtypes, axes,
   iteration counts and dot-precision modes (their outputs are garbage: only shapes and dtypes matter).
   Each launch is bound exactly as `JITFunction.run` binds it (Triton's own binder and `_pack_args`:
   argument types, specialisations such as 16-divisibility and ints equal to 1, constexprs, options),
   and launches are deduplicated by the key of Triton's JIT cache.
2. Compile each unique launch with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`
   (2 processes at most), then run the ptxas that ships with Triton with -v on the PTX for registers,
   stack frame and spills.
3. Print a table and exit 1 on a compile error, a register spill, or a backend function that recorded
   no launch at all (a sign that the recorder broke).

Works with triton 3.6 (the GPU machine's, `.venv-device`) and 3.8 (CI's `.venv`):
    .venv-device/bin/python bench/aot_compile.py            # everything (a few minutes on 2 cores)
    .venv-device/bin/python bench/aot_compile.py --list     # enumerate only
    python bench/aot_compile.py --functions nmse_fwd --dtypes float32 --modes auto   # a quick subset
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = 90  # compute capability compiled for (H200)
FUNCTIONS = ("iternorm_fwd", "iternorm_bwd", "trace_loss_fwd", "trace_loss_bwd", "nmse_fwd", "nmse_bwd",
             "intl_head_fwd", "intl_head_bwd")
DTYPES = ("float32", "float16", "bfloat16")
FP32_MATMUL = ("highest", "high")  # torch's fp32 matmul precision: some modes follow it
ITERS = (1, 4)
# (input shape, axis). C (variables) = m for axis=0, d for axis=1; N (observations) = the other.
# They cover: C <= 256 and 256 < C <= 320 (the row-block Newton-Schulz steps, 16- and 32-row blocks),
# C > 320 with 64 x 64 tiles and C >= 1024 with 128 x 128 tiles (the tiled path), batched (K, m, d)
# inputs and N > 2048 (a covariance split over N), all with sizes that are multiples of 16, as in
# training and the benchmarks. (On CPU tensors sm_count is 1: the row-block kernels run with one
# column group here; the groups change runtime arguments only, not the compiled kernels.)
SCENARIOS = (
    ((256, 384), 0), ((256, 384), 1),
    ((2, 128, 640), 0), ((2, 128, 640), 1),
    ((64, 2304), 0), ((48, 1152), 1), ((48, 288), 1),
)
# --unaligned adds sizes that are not multiples of 16: Triton then drops its 16-divisibility hints,
# which doubles the configurations (and the compile time) and costs registers.
UNALIGNED_SCENARIOS = (((3, 50, 90), 0), ((3, 50, 90), 1))

PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTX_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.M)


@dataclasses.dataclass
class Job:
    """One unique launch configuration, ready for triton.compile."""
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    origins: set = dataclasses.field(default_factory=set)  # the backend functions that launch it

    @property
    def name(self) -> str:
        return self.fn.__name__

    def declared_constexprs(self) -> str:
        """NAME=value of the kernel's own tl.constexpr parameters."""
        return " ".join(f"{p.name}={self.constexprs[(p.num,)]}" for p in self.fn.params if p.is_constexpr)

    def pointer_types(self) -> str:
        """The distinct element types of the pointer arguments, e.g. "fp16,fp32"."""
        types = [t[1:] for t in self.signature.values() if isinstance(t, str) and t.startswith("*")]
        return ",".join(dict.fromkeys(types))

    def specialised(self) -> str:
        """Plain arguments that Triton specialised to a constant (ints equal to 1), and the ints and
        pointers without the 16-divisibility hint ("~name"): the variants besides the constexprs."""
        out = []
        for p in self.fn.params:
            if p.is_constexpr:
                continue
            if self.signature[p.name] == "constexpr":
                out.append(f"{p.name}={self.constexprs[(p.num,)]}")
            elif self.signature[p.name][0] in "*iu" and not self.attrs.get((p.num,)):
                out.append(f"~{p.name}")
        return " ".join(out)


# ------------------------------------------------------------------ 1. enumerate
class Recorder:
    """Stands in for JITFunction.run: binds each launch as Triton's launcher does and keeps the
    unique ones, keyed like Triton's JIT cache."""

    def __init__(self, functions=FUNCTIONS):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", ARCH, 32)
        self.backend = make_backend(self.target)
        self.jobs: dict[tuple, Job] = {}
        self.counts = {f: 0 for f in functions}  # launches recorded per backend function (the others are skipped)
        self.function = None  # the backend function running now
        self._binders = {}

    def _binder(self, fn):
        from triton.runtime.jit import create_function_from_signature

        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        return self._binders[fn]

    def record(self, fn, args, kwargs) -> None:
        from triton import knobs

        # the two options JITFunction.run adds before binding
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, specialization, options = self._binder(fn)(*args, **kwargs)
        key = (fn, str(specialization), str(options))
        if key not in self.jobs:
            opts, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
            self.jobs[key] = Job(fn, signature, constexprs, attrs, opts.__dict__)
        self.jobs[key].origins.add(self.function)
        self.counts[self.function] += 1

    @contextlib.contextmanager
    def patched(self):
        """JITFunction.run records instead of launching; an @triton.autotune kernel records each of
        its (pruned) configs instead of benchmarking them, as its warmup() does."""
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        def run(fn, *args, grid, warmup, **kwargs):
            self.record(fn, args, kwargs)

        def autotune_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            for config in tuner.prune_configs(kwargs):
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None

        originals = JITFunction.run, Autotuner.run
        JITFunction.run, Autotuner.run = run, autotune_run
        try:
            yield self
        finally:
            JITFunction.run, Autotuner.run = originals

    def call(self, module, name: str, *args):
        """Run one backend function with launches recorded; returns its (garbage) outputs."""
        if name not in self.counts:
            return None
        self.function = name
        return getattr(module, name)(*args)


def import_backend():
    """intl_ops.backend_triton with real (not interpreted) kernels."""
    if os.environ.pop("TRITON_INTERPRET", "0") == "1" and any(m.startswith("intl_ops.kernels.") for m in sys.modules):
        raise RuntimeError("the kernels were already defined under TRITON_INTERPRET=1: run in a fresh process")
    os.environ.pop("INTL_OPS_DOT_PRECISION", None)  # the modes are set explicitly below
    sys.path.insert(0, str(ROOT))
    from intl_ops import backend_triton
    import intl_ops.kernels._common as common

    if getattr(backend_triton, "_IMPORT_ERROR", None):
        raise RuntimeError(f"the Triton kernels do not import: {backend_triton._IMPORT_ERROR}")
    return backend_triton, common


def exercise(rec: Recorder, bt, torch, shape, axis: int, dtype, iters: int) -> None:
    """Every backend function once on an input of this shape/axis/dtype, as the ops call them."""
    x = torch.randn(shape).to(dtype)
    saved = rec.call(bt, "iternorm_fwd", x, iters, axis)
    if saved is None:  # iternorm_fwd filtered out: its outputs still feed the others
        saved = _fake_saved(torch, x, iters, axis)
    y, mean, S, tr, Ps, powers, v = saved
    gy, gv = torch.randn_like(y), torch.randn_like(v)
    rec.call(bt, "iternorm_bwd", gy, gv, y, x, mean, S, tr, Ps, powers, iters, axis)
    batch = y.shape[:-2]
    rec.call(bt, "trace_loss_fwd", y, axis)
    rec.call(bt, "trace_loss_bwd", torch.randn(batch), y, axis)
    if y.dim() == 3:  # intl_loss's calls: views 1.. against view 0 broadcast (stride 0), and a full pair
        rec.call(bt, "nmse_fwd", y[1:], y[:1].expand_as(y[1:]))
        rec.call(bt, "nmse_bwd", torch.randn(y.shape[0] - 1), y[1:], y[:1].expand_as(y[1:]))
    rec.call(bt, "nmse_fwd", y, gy)
    rec.call(bt, "nmse_bwd", torch.randn(batch), y, gy)
    # the row-block kernels (nmse, intl_loss's head) size BLOCK_M by the SM count: also for the H200's 132
    from intl_ops.kernels._common import assume_gpu

    views = y if y.dim() == 3 else torch.stack([y, gy])  # the head's K >= 2 views
    hv = torch.rand(views.shape[0], v.shape[-1])
    for sms in (1, 132):
        with assume_gpu(sms):
            rec.call(bt, "nmse_fwd", y, gy)
            rec.call(bt, "nmse_bwd", torch.randn(batch), y, gy)
            for target in (None, views[0], views[0].float()):  # INTL, INTL-M, INTL-M with an fp32 target
                rec.call(bt, "intl_head_fwd", views, hv, target, 0.05)
                rec.call(bt, "intl_head_bwd", torch.ones(()), views, hv, target, 0.05)


def _fake_saved(torch, x, iters: int, axis: int):
    """Tensors shaped like iternorm_fwd's outputs (for a run with iternorm_fwd filtered out)."""
    C = x.shape[-2] if axis == 0 else x.shape[-1]
    b = x.shape[:-2]
    f = dict(dtype=torch.float32)
    return (torch.randn(x.shape).to(x.dtype), torch.randn(*b, C, **f), torch.randn(*b, C, C, **f),
            torch.rand(b, **f) + 1, torch.randn(*b, iters, C, C, **f),
            torch.randn(*b, max(iters - 1, 0), 2, C, C, **f), torch.rand(*b, C, **f))


def enumerate_launches(functions, dtypes, modes, scenarios=SCENARIOS) -> tuple[Recorder, list[str]]:
    """Record every launch of the chosen backend functions; returns the recorder and the modes used."""
    import torch

    bt, common = import_backend()
    modes = [m for m in common.DOT_MODES if modes is None or m in modes]
    rec = Recorder(functions)
    old_fp32, old_mode = torch.get_float32_matmul_precision(), common.get_dot_precision()
    try:
        with rec.patched():
            for mode, fp32, dtype, (shape, axis), iters in itertools.product(modes, FP32_MATMUL, dtypes,
                                                                             scenarios, ITERS):
                common.set_dot_precision(mode)
                torch.set_float32_matmul_precision(fp32)
                exercise(rec, bt, torch, shape, axis, getattr(torch, dtype), iters)
    finally:
        torch.set_float32_matmul_precision(old_fp32)
        common.set_dot_precision(old_mode)
    return rec, modes


def unlaunched_kernels(rec: Recorder) -> list[str]:
    """JIT functions of the kernels package that no host code launched and no other JIT function calls:
    kernels that the scenarios miss (or dead code)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit(obj):  # an @triton.autotune kernel wraps its JITFunction
        return obj.fn if isinstance(obj, Autotuner) else obj

    fns = {jit(obj) for name, mod in list(sys.modules.items()) if name.startswith("intl_ops.kernels.")
           for obj in vars(mod).values() if isinstance(jit(obj), JITFunction)}
    launched = {job.fn for job in rec.jobs.values()}
    called = {f for f in fns for g in fns if g is not f and re.search(rf"\b{f.__name__}\s*\(", g.src)}
    return sorted(f"{f.module}.{f.__name__}" for f in fns - launched - called)


# ------------------------------------------------------------------ 2. compile
_JOBS: list[Job] = []  # set before the worker processes fork
_TARGET = None


def parse_ptxas(log: str) -> dict:
    """registers / stack frame / spill stores and loads of the (single) kernel in a ptxas -v log."""
    out = {}
    if m := PTXAS_PROPS.search(log):
        out.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    if m := PTXAS_REGS.search(log):
        out["regs"] = int(m.group(1))
    return out


def ptxas_report(ptx: str, options: dict) -> dict:
    """Run Triton's ptxas with -v on the PTX, with the flags Triton compiles it with."""
    from triton.backends.nvidia.compiler import get_ptxas

    m = PTX_TARGET.search(ptx)
    arch = m.group(1) if m else f"sm_{ARCH}a"
    flags = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
    flags += (options.get("ptx_options") or "").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([get_ptxas(ARCH).path, "-v", *flags, f"--gpu-name={arch}", str(src),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    return parse_ptxas(proc.stderr + proc.stdout)


def compile_job(i: int) -> dict:
    """Compile _JOBS[i] for sm_90 (in a worker process); its resource usage or the error."""
    import triton
    from triton.compiler import ASTSource

    job = _JOBS[i]
    t0 = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(job.fn, job.signature, job.constexprs, job.attrs),
                                target=_TARGET, options=job.options)
        res = ptxas_report(kernel.asm["ptx"], job.options)
        res["shared"] = kernel.metadata.shared
    except Exception as exc:  # noqa: BLE001  (reported in the table; the run fails)
        lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
        res = {"error": "\n".join(lines[:25])}
    res["seconds"] = time.perf_counter() - t0
    return res


def compile_all(jobs: list[Job], target, workers: int) -> list[dict]:
    global _JOBS, _TARGET
    _JOBS, _TARGET = jobs, target
    if workers <= 1:
        return [compile_job(i) for i in range(len(jobs))]
    # fork: the workers inherit the jobs (JITFunctions are not picklable)
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(compile_job, range(len(jobs))))


# ------------------------------------------------------------------ 3. report
def failures(job: Job, res: dict) -> list[str]:
    if "error" in res:
        return ["compile error"]
    if res.get("spill_stores", 0) or res.get("spill_loads", 0):
        return [f"spills {res['spill_stores']}/{res['spill_loads']} bytes"]
    if "regs" not in res:
        return ["no ptxas report"]
    return []


def sort_key(job: Job):
    return job.name, job.pointer_types(), job.declared_constexprs(), job.specialised()


def print_table(jobs: list[Job], results: list[dict]) -> None:
    rows = [("kernel", "pointers", "constexprs", "specialised", "warps", "stages", "regs", "spill st/ld", "stack",
             "smem", "s")]
    for job, res in sorted(zip(jobs, results), key=lambda jr: sort_key(jr[0])):
        spill = "ERROR" if "error" in res else f"{res.get('spill_stores', '?')}/{res.get('spill_loads', '?')}"
        rows.append((job.name, job.pointer_types(), job.declared_constexprs(), job.specialised(),
                     str(job.options["num_warps"]), str(job.options["num_stages"]), str(res.get("regs", "-")), spill,
                     str(res.get("stack", "-")), str(res.get("shared", "-")), f"{res['seconds']:.1f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) if c < 4 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))


def to_json(jobs: list[Job], results: list[dict]) -> list[dict]:
    return [dict(kernel=j.name, module=j.fn.module, pointers=j.pointer_types(), constexprs=j.declared_constexprs(),
                 specialised=j.specialised(), signature=j.signature, num_warps=j.options["num_warps"],
                 num_stages=j.options["num_stages"], origins=sorted(j.origins), **r) for j, r in zip(jobs, results)]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="enumerate the launches only, compile nothing")
    ap.add_argument("--functions", nargs="+", choices=FUNCTIONS, default=list(FUNCTIONS))
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    ap.add_argument("--modes", nargs="+", default=None, help="dot-precision modes (default: all)")
    ap.add_argument("--unaligned", action="store_true", help="also sizes that are not multiples of 16")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (1 or 2)")
    ap.add_argument("--cache-dir", default=str(ROOT / "build" / "triton-aot-cache"),
                    help="TRITON_CACHE_DIR of the compiles ('' for a fresh temporary one)")
    ap.add_argument("--json", help="write the configurations (and results) to this file")
    return ap.parse_args(argv)


def list_jobs(jobs: list[Job]) -> None:
    for j in sorted(jobs, key=sort_key):
        print(f"  {j.name:<24} {j.pointer_types():<10} {j.declared_constexprs()}  [{j.specialised()}]  "
              f"warps={j.options['num_warps']}")


def compile_and_print(jobs: list[Job], target, args) -> list[dict]:
    cache = args.cache_dir or tempfile.mkdtemp(prefix="triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache
    workers = max(1, min(args.jobs, 2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    results = compile_all(jobs, target, workers)
    print_table(jobs, results)
    print(f"compiled {len(jobs)} configurations in {time.perf_counter() - t0:.0f} s ({workers} processes, "
          f"cache {cache})")
    return results


def verdict(jobs: list[Job], results: list[dict], counts: dict, compiled: bool) -> bool:
    """Print what failed; True if nothing did."""
    bad = [(j, r, why) for j, r in zip(jobs, results) for why in failures(j, r)] if compiled else []
    for j, r, why in bad:
        print(f"\nFAILED {j.name} ({j.pointer_types()}) [{j.declared_constexprs()}] [{j.specialised()}] "
              f"warps={j.options['num_warps']}: {why}\n{r.get('error', '')}")
    missing = [f for f, n in counts.items() if n == 0]
    if missing:
        print(f"FAILED: no launch recorded for {', '.join(missing)} (the recorder or the enumeration broke)")
    print(f"aot-compile {'FAILED' if bad or missing else 'OK'}: {len(jobs)} configurations, {len(bad)} failed")
    return not (bad or missing)


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    t0 = time.perf_counter()
    scenarios = SCENARIOS + (UNALIGNED_SCENARIOS if args.unaligned else ())
    rec, modes = enumerate_launches(args.functions, args.dtypes, args.modes, scenarios)
    jobs = list(rec.jobs.values())
    print(f"triton {triton.__version__}, target sm_{ARCH}: {sum(rec.counts.values())} launches recorded "
          f"({', '.join(f'{f} {n}' for f, n in rec.counts.items())}) in {time.perf_counter() - t0:.1f} s, "
          f"{len(jobs)} unique configurations of {len({j.fn for j in jobs})} kernels; dot modes {modes}")
    unlaunched = unlaunched_kernels(rec) if len(args.functions) == len(FUNCTIONS) else []
    if unlaunched:
        print(f"WARNING: never launched by the enumeration: {', '.join(unlaunched)}")
    if args.list:
        list_jobs(jobs)
        results = [{} for _ in jobs]
    else:
        results = compile_and_print(jobs, rec.target, args)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(triton=triton.__version__, counts=rec.counts, modes=modes,
                                                   unlaunched=unlaunched, configs=to_json(jobs, results)),
                                              indent=1, default=str))
    ok = verdict(jobs, results, rec.counts, compiled=not args.list)
    print(f"wall {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
