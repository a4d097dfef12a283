"""Performance model: predicted H200 time of each provider's call, from the launches the code really makes.

No GPU is needed and nothing is measured: every number this module prints is a model prediction and
is labelled "model". How it works:
1. Record (`record`, `Recorder`). The call runs on CPU tensors (predict(): fake ones, so even C = 4096
   costs no compute) with every kernel launch a GPU would see recorded instead of run:
   - torch: a TorchDispatchMode records each aten op; ops that only allocate or make views launch
     nothing (host time only). GEMM FLOPs come from torch.utils.flop_counter's formulas, other ops
     count one FLOP per element; bytes are those of the tensor inputs and outputs.
   - Triton: JITFunction.run and Autotuner.run are patched as in bench/aot_compile.py: each launch is
     bound by parameter name, its grid evaluated; an autotuned launch keeps every pruned config.
   - intl custom ops run their Python implementation (the backend's host code), recorded too;
     the Triton backend is told it may run on CPU and sizes its grids for the H200's SMs.
2. Cost. A Triton launch's FLOPs and bytes come from the COSTS table of its kernels module
   (intl_ops.kernels.<module>.COSTS[kernel name](bound args, grid) -> Work): a kernel without an entry
   is an error. An autotuned launch is timed for each config and the fastest prediction kept.
3. Time (`_device_seconds`), per launch: KERNEL_FIXED_S + max(compute, memory) with
       compute = ceil(P / SMS) * (FLOPs / P) / (peak / SMS * efficiency)   P programs, the busiest SM
       memory  = bytes / (HBM bandwidth * min(1, occupancy / HBM_SATURATING_OCCUPANCY))
   occupancy = the fraction of the GPU's resident-program slots (SMS * programs per SM) the launch
   fills. The call's device time is the sum over launches (what a CUDA graph replay takes), its host
   time the sum of per-launch issue costs (HOST_S), and its predicted time the larger of the two
   (the CPU runs ahead of the GPU; the slower stream bounds the call).

    python -m bench --model [-v] [--ops ...] [--dtypes ...] [--providers ...] [--modes ...]
    bench.model.predict("triton", Case("intl_loss", 256, 8192, k=2), "full").seconds
    bench.model.plan_seconds(lambda: newton_schulz_fwd(S, Ps, powers)).device_s
Needs TRITON_INTERPRET unset: the kernels must be JITFunctions, not the interpreter's.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import pkgutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from . import providers as P
from . import report, roofline
from .providers import Case

# ------------------------------------------------------------------ the H200 and every assumption
# Datasheet / measured (bench/roofline.py's H200 table, ../shared/GPU.md):
SMS = 132                                    # datasheet: streaming multiprocessors of an H200
HBM_BYTES_PER_S = roofline.H200["bytes_per_s"]  # measured: device copy, 4.3 TB/s (bytes read + written)
PEAK_FLOPS = {                               # by the precision a launch's products run at
    "bf16": roofline.H200["bf16"],           # measured: 8192^3 bf16 matmul, 790 TFLOP/s
    "fp16": roofline.H200["fp16"],           # datasheet: as bf16
    "tf32": roofline.H200["tf32"],           # datasheet lead: half of bf16, 395 TFLOP/s
    "tf32x3": roofline.H200["tf32"] / 3,     # assumption: three tf32 MMAs per product, 132 TFLOP/s
    "fp32": roofline.H200["fp32"],           # datasheet: FMA without tensor cores, 67 TFLOP/s
}
# Assumptions (no GPU run has checked them yet; a measured run should recalibrate them):
KERNEL_FIXED_S = 2.5e-6          # assumption: device time of any kernel besides its work (launch latency, ramp, tail)
TRITON_DOT_EFFICIENCY = 0.6      # assumption: fraction of peak a Triton tile GEMM reaches
CUBLAS_EFFICIENCY = 0.75         # assumption: fraction of peak a cuBLAS GEMM reaches
HBM_SATURATING_OCCUPANCY = 0.4   # assumption: HBM bandwidth saturates once 40% of the resident-program slots are busy
DOT_PROGRAMS_PER_SM = 1          # assumption: a tile-GEMM program (Triton with tl.dot, or a cuBLAS tile) fills an SM
TRITON_PROGRAMS_PER_SM = 4       # assumption: Triton programs without tl.dot resident per SM
TORCH_BLOCKS_PER_SM = 8          # assumption: blocks of a torch elementwise / reduction kernel resident per SM
TORCH_ELEMENTS_PER_BLOCK = 512   # assumption: a torch elementwise / reduction block covers 128 threads x 4 elements
CUBLAS_TILES = (128, 64)         # assumption: cuBLAS tiles are 128 x 128, or 64 x 64 when 128-tiles fill < SMS / 2
SPLIT_K_MIN_RATIO = 4            # assumption: cuBLAS splits K when the tiles are fewer than SMS and K >= 4 max(M, N),
SPLIT_K_MIN_DEPTH = 256          # assumption: into min(SMS // tiles, K // 256) chunks (fp32 partials written, read)
HOST_S = {                       # host time to issue one recorded event, by kind
    "triton": 6e-6,              # assumption: triton 3.6's Python launcher, argument binding included
    "torch": 4e-6,               # assumption: an eager aten op that launches a kernel
    "torch-meta": 0.5e-6,        # assumption: an aten op that launches nothing (view, empty, metadata)
    "custom-op": 15e-6,          # assumption: torch.library.custom_op's Python dispatch of one intl op
    "autograd-node": 2e-6,       # assumption: the autograd engine's own work per node in backward
}
# aten ops that launch no kernel although they are not views (allocation, metadata)
NO_KERNEL_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
                           "lift_fresh", "resize_", "set_"})
HEADLINE_CASES = (
    Case("intl_loss", 256, 8192, axis=0, k=2, dtype="fp32"), Case("intl_loss", 256, 8192, axis=0, k=2, dtype="bf16"),
    Case("iternorm", 256, 8192, axis=0, dtype="fp32"),
    Case("intl_loss", 256, 4096, axis=1, k=2, dtype="fp32"), Case("iternorm", 256, 4096, axis=1, dtype="fp32"),
    Case("intl_loss", 256, 1024, axis=1, k=2, dtype="fp32"),
)
# providers of bench/providers.py whose launches the recorder cannot see the way the GPU would get them
NOT_MODELLED = {"eager-amp": "CPU autocast casts other ops than CUDA autocast",
                "compiled": "inductor generates its own kernels for the GPU"}


# ------------------------------------------------------------------ 1. recording
@dataclass(frozen=True)
class Config:
    """One way a Triton launch may run: grid, arguments bound by parameter name, options (num_warps ...)."""
    grid: tuple[int, int, int]
    args: dict
    options: dict


@dataclass(frozen=True)
class TorchKernel:
    """What an aten op's kernel does (costed when recorded: its arguments are gone afterwards)."""
    flops: float
    bytes: float
    programs: int
    per_sm: int              # programs resident per SM
    precision: str | None    # a key of PEAK_FLOPS for GEMMs; None: no products (FLOPs at the fp32 peak)


@dataclass(frozen=True)
class Launch:
    """One recorded event. kind: "triton" (configs: one, or every pruned config of an autotuned kernel),
    "torch" (an aten op that launches a kernel: kernel), or host time only: "torch-meta" (an aten op
    that launches nothing), "custom-op" (an intl op's Python dispatch), "autograd-node"."""
    kind: str
    name: str
    module: str = ""                       # triton: the module whose COSTS must cost it
    configs: tuple[Config, ...] = ()
    kernel: TorchKernel | None = None


def _check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("bench.model records the launches of the compiled Triton kernels: unset TRITON_INTERPRET "
                           "(tests run the model in a subprocess without it)")
    from intl_ops import backend_triton
    if backend_triton._INTERPRET_AT_IMPORT:
        raise RuntimeError("the Triton kernels were defined under TRITON_INTERPRET=1: run the model in a fresh process")
    if backend_triton._IMPORT_ERROR:
        raise RuntimeError(f"the Triton kernels do not import: {backend_triton._IMPORT_ERROR}")


def _unique_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel reads or writes for t: broadcast (stride-0) dimensions count once."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


def _gemm_precision(dtype: torch.dtype) -> str:
    from intl_ops.kernels._common import torch_allows_tf32

    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    if dtype == torch.float32:
        return "tf32" if torch_allows_tf32() else "fp32"  # torch's default "highest": no tensor cores
    raise ValueError(f"the model has no H200 peak for {dtype} products")


def _torch_kernel(func, args, kwargs, out) -> TorchKernel:
    """Cost of one kernel-launching aten op from its tensors (out= arguments count as outputs only)."""
    outs = {a.name for a in func._schema.arguments if a.is_out}
    ins = [t for t in tree_leaves((args, {k: v for k, v in kwargs.items() if k not in outs}))
           if isinstance(t, torch.Tensor)]
    results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    nbytes = sum(_unique_bytes(t) for t in ins + results)
    formula = _flop_formula(func)
    if formula is not None:  # GEMM-like: cuBLAS tiles of the output, split-K when K is long
        flops = formula(*args, **kwargs, out_val=out)
        o = results[0]
        M, N = (o.shape[-2], o.shape[-1]) if o.dim() >= 2 else (1, o.numel())
        batch = o.numel() // max(M * N, 1)
        for edge in CUBLAS_TILES:  # the largest tile that still fills half the SMs, else the smallest
            tiles = batch * math.ceil(M / edge) * math.ceil(N / edge)
            if tiles >= SMS // 2:
                break
        K = flops / max(2 * o.numel(), 1)
        splits = 1
        if tiles < SMS and K >= SPLIT_K_MIN_RATIO * max(M, N):
            splits = max(1, min(SMS // tiles, int(K // SPLIT_K_MIN_DEPTH)))
        if splits > 1:
            nbytes += 2 * splits * o.numel() * 4  # fp32 partial products written, then read by the reduction
        return TorchKernel(float(flops), float(nbytes), tiles * splits, DOT_PROGRAMS_PER_SM,
                           _gemm_precision(ins[0].dtype))
    n = max([t.numel() for t in ins + results] or [1])
    return TorchKernel(float(n), float(nbytes), max(1, math.ceil(n / TORCH_ELEMENTS_PER_BLOCK)),
                       TORCH_BLOCKS_PER_SM, None)


def _flop_formula(func):
    """torch.utils.flop_counter's formula for a GEMM-like op (its in-place variant: the out-of-place one's),
    None for other ops."""
    packet = func._overloadpacket
    if packet not in flop_registry and packet.__name__.endswith("_"):  # addmm_, baddbmm_
        packet = getattr(torch.ops.aten, packet.__name__[:-1], packet)
    return flop_registry.get(packet)


def _launches_kernel(func) -> bool:
    return not func.is_view and func._schema.name.split("::")[1] not in NO_KERNEL_OPS


class _TorchOps(TorchDispatchMode):
    """Records every aten op it sees into rec.launches; runs intl custom ops' Python implementations
    (not their fake) and decomposes composite ops, so that the ops inside are seen too."""

    def __init__(self, rec: "Recorder"):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "intl":
            from torch._library.custom_ops import OPDEFS  # torch's registry of custom_op definitions (private)

            self.rec.launches.append(Launch("custom-op", func.name()))
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        if func.namespace == "prim":  # metadata queries (prim.device)
            return func(*args, **kwargs)
        if func.namespace != "aten":
            raise NotImplementedError(f"the model cannot cost {func}: only aten ops, intl ops and Triton launches")
        # inside a custom op (below autograd) composite ops such as matmul arrive whole: see their parts
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if _launches_kernel(func):
            self.rec.launches.append(Launch("torch", func.name(), kernel=_torch_kernel(func, args, kwargs, out)))
        else:
            self.rec.launches.append(Launch("torch-meta", func.name()))
        return out


def _bind(fn, args, kwargs, grid) -> Config:
    """A Triton launch as a Config: arguments by parameter name (defaults filled), grid evaluated
    (a callable grid gets the bound arguments, as JITFunction.run does), the rest as options."""
    bound = {}
    for i, p in enumerate(fn.params):
        if i < len(args):
            bound[p.name] = args[i]
        elif p.name in kwargs:
            bound[p.name] = kwargs[p.name]
        elif p.has_default:
            bound[p.name] = p.default
        else:
            raise TypeError(f"{fn.__name__}: no value for parameter {p.name}")
    g = tuple(grid(bound) if callable(grid) else grid)
    options = {k: v for k, v in kwargs.items() if k not in bound}
    return Config(tuple(int(x) for x in g) + (1,) * (3 - len(g)), bound, options)


def _jit(fn):
    """The JITFunction under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


class Recorder:
    """While `capture()` is open, every kernel launch is appended to the list it yields: Triton launches
    through patched JITFunction.run / Autotuner.run (nothing runs), torch ops through _TorchOps."""

    def __init__(self):
        self.launches: list[Launch] | None = None
        self._configs: list[Config] | None = None  # the configs of the autotuned launch being recorded

    @contextlib.contextmanager
    def capture(self):
        self.launches = []
        try:
            with _TorchOps(self):
                yield self.launches
        finally:
            self.launches = None

    def _run(self, fn, *args, grid, warmup, **kwargs):
        if self.launches is None:
            raise RuntimeError(f"Triton launch of {fn.__name__} outside Recorder.capture()")
        config = _bind(fn, args, kwargs, grid)
        if self._configs is not None:
            self._configs.append(config)
        else:
            self.launches.append(Launch("triton", fn.__name__, fn.module, (config,)))

    def _autotune_run(self, tuner, *args, **kwargs):
        """Each pruned config recorded as a candidate of one launch (as bench/aot_compile.py enumerates them)."""
        tuner.nargs = dict(zip(tuner.arg_names, args))
        self._configs = []
        try:
            for config in tuner.prune_configs(kwargs):
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            fn = _jit(tuner.fn)
            self.launches.append(Launch("triton", fn.__name__, fn.module, tuple(self._configs)))
        finally:
            self._configs, tuner.nargs = None, None

    @contextlib.contextmanager
    def patched(self, fake: bool):
        """The environment of a recording: Triton patched, the Triton backend allowed on CPU tensors
        with grids sized for SMS, and (fake=True) FakeTensorMode on the CPU device: no compute at all."""
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        _check_not_interpreted()
        from intl_ops import backend_triton
        from intl_ops.kernels._common import assume_gpu

        rec = self
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(JITFunction, "run", lambda fn, *a, **k: rec._run(fn, *a, **k)))
            stack.enter_context(mock.patch.object(Autotuner, "run", lambda t, *a, **k: rec._autotune_run(t, *a, **k)))
            on_cpu = lambda device: None if torch.device(device).type == "cpu" else "recording: CPU only"  # noqa: E731
            stack.enter_context(mock.patch.object(backend_triton, "unavailable_reason", on_cpu))
            stack.enter_context(assume_gpu(SMS))
            if fake:
                from torch._subclasses.fake_tensor import FakeTensorMode
                stack.enter_context(FakeTensorMode())
            yield self


def record(fn: Callable[[], object], fake: bool = False) -> list[Launch]:
    """Run fn() with every launch recorded (Triton launches are not run: their outputs are garbage, only
    shapes matter). fake=True runs it under FakeTensorMode: tensors fn creates are fake (no compute)."""
    rec = Recorder()
    with rec.patched(fake), rec.capture() as launches:
        fn()
    return launches


def _autograd_nodes(out: torch.Tensor) -> list[Launch]:
    """One host-only event per node the backward of `out` will run."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [f for f, _ in node.next_functions]
    return [Launch("autograd-node", type(n).__name__) for n in seen]


def record_forward_backward(forward: Callable[[list[torch.Tensor]], torch.Tensor], shapes, dtype: torch.dtype
                            ) -> tuple[tuple[Launch, ...], tuple[Launch, ...]]:
    """(forward, backward) launches of out = forward(xs) and out.backward(dy) (dy None for a scalar, as
    bench/measure.py calls it), on fake CPU inputs of these shapes that require grad."""
    rec = Recorder()
    with rec.patched(fake=True):
        xs = [torch.empty(shape, dtype=dtype).requires_grad_(True) for shape in shapes]
        with rec.capture() as fwd:
            out = forward(xs)
        dy = None if out.dim() == 0 else torch.empty_like(out)
        nodes = _autograd_nodes(out)
        with rec.capture() as bwd:
            out.backward(dy)
    return tuple(fwd), tuple(nodes + bwd)


@functools.lru_cache(maxsize=None)
def record_case(provider: str, case: Case) -> tuple[tuple[Launch, ...], tuple[Launch, ...]]:
    """(forward, backward) launches of bench's call for (case, provider): the forward as
    bench/providers.py sets it up, on K views of (m, d)."""
    return record_forward_backward(P.get_forward(case, provider), [(case.m, case.d)] * case.k, P.DTYPES[case.dtype])


# ------------------------------------------------------------------ 2. costs of Triton launches
def triton_costs() -> dict[str, Callable]:
    """{kernel name: cost function} from the COSTS dict of every module of intl_ops.kernels."""
    import intl_ops.kernels as pkg

    costs: dict[str, Callable] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        costs.update(getattr(importlib.import_module(f"{pkg.__name__}.{info.name}"), "COSTS", {}))
    return costs


def _triton_precision(config: Config) -> str | None:
    """The peak a launch's products run at, from its constexprs; None for a kernel without tl.dot
    (the kernels' convention: every kernel with products takes PREC, and HALF_DOT if fp16/bf16 tiles may go in)."""
    args = config.args
    if "PREC" not in args:
        return None
    if args.get("HALF_DOT"):
        half = next(t.dtype for t in args.values() if isinstance(t, torch.Tensor)
                    and t.dtype in (torch.float16, torch.bfloat16))
        return "bf16" if half == torch.bfloat16 else "fp16"
    return {"ieee": "fp32"}.get(args["PREC"], args["PREC"])


# ------------------------------------------------------------------ 3. time
@dataclass(frozen=True)
class Cost:
    """The model's view of one event (device_s 0 for host-only events; precision "-": no products)."""
    kind: str
    name: str
    programs: int = 0
    waves: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    precision: str = ""
    device_s: float = 0.0
    host_s: float = 0.0


def _device_seconds(flops: float, nbytes: float, programs: int, per_sm: int, precision: str | None,
                    efficiency: float) -> tuple[float, int]:
    """(device seconds, waves) of one kernel: the module docstring's formula. precision None: no
    products, the FLOPs run at the fp32 peak (such kernels are memory-bound anyway)."""
    programs = max(1, programs)
    slots = SMS * per_sm
    peak = PEAK_FLOPS[precision or "fp32"] * (efficiency if precision else 1.0)
    compute = math.ceil(programs / SMS) * (flops / programs) / (peak / SMS)
    occupancy = min(programs, slots) / slots
    memory = nbytes / (HBM_BYTES_PER_S * min(1.0, occupancy / HBM_SATURATING_OCCUPANCY))
    return KERNEL_FIXED_S + max(compute, memory), math.ceil(programs / slots)


def _triton_cost(launch: Launch, costs: dict[str, Callable]) -> Cost:
    if launch.name not in costs:
        raise KeyError(f"no performance-model cost for Triton kernel {launch.name}: add "
                       f"COSTS['{launch.name}'] = fn(bound args, grid) -> Work to {launch.module}")
    best = None
    for c in launch.configs:  # an autotuned launch: the fastest predicted config, as the autotuner keeps the fastest
        w = costs[launch.name](c.args, c.grid)
        prec = _triton_precision(c)
        programs = w.programs if w.programs is not None else math.prod(c.grid)  # early-exit programs are free
        t, waves = _device_seconds(w.flops, w.bytes, programs, DOT_PROGRAMS_PER_SM if prec else TRITON_PROGRAMS_PER_SM,
                                   prec, TRITON_DOT_EFFICIENCY)
        if best is None or t < best.device_s:
            best = Cost("triton", launch.name, programs, waves, w.flops, w.bytes, prec or "-", t, HOST_S["triton"])
    return best


def cost(launch: Launch, costs: dict[str, Callable]) -> Cost:
    """The model's Cost of one event; costs: triton_costs()."""
    if launch.kind == "triton":
        return _triton_cost(launch, costs)
    if launch.kind == "torch":
        k = launch.kernel
        t, waves = _device_seconds(k.flops, k.bytes, k.programs, k.per_sm, k.precision, CUBLAS_EFFICIENCY)
        return Cost("torch", launch.name, k.programs, waves, k.flops, k.bytes, k.precision or "-", t, HOST_S["torch"])
    return Cost(launch.kind, launch.name, host_s=HOST_S[launch.kind])


@dataclass
class Prediction:
    """A call's predicted time: device_s (the sum over kernels: a CUDA graph replay), host_s (issuing
    every event), seconds = max of the two. breakdown: one Cost per launch, in launch order."""
    launches: list[Launch]
    breakdown: list[Cost] = field(init=False)

    def __post_init__(self):
        costs = triton_costs()
        self.breakdown = [cost(launch, costs) for launch in self.launches]

    @property
    def device_s(self) -> float:
        return sum(c.device_s for c in self.breakdown)

    @property
    def host_s(self) -> float:
        return sum(c.host_s for c in self.breakdown)

    @property
    def seconds(self) -> float:
        return max(self.device_s, self.host_s)

    def count(self, kind: str) -> int:
        return sum(launch.kind == kind for launch in self.launches)

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.breakdown)

    @property
    def bytes(self) -> float:
        return sum(c.bytes for c in self.breakdown)


def predict(provider: str, case: Case, mode: str) -> Prediction:
    """The model's prediction for bench's (case, provider) in mode forward / backward / full."""
    if mode not in P.MODES:
        raise ValueError(f"mode must be one of {P.MODES}, got {mode!r}")
    fwd, bwd = record_case(provider, case.with_mode("full"))
    return Prediction(list({"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]))


def plan_seconds(fn: Callable[[], object], fake: bool = False) -> Prediction:
    """The prediction for any call (e.g. a kernels-module launcher on CPU tensors): record(fn), costed."""
    return Prediction(record(fn, fake))


def newton_schulz_paths(C: int, views: int = 2, iters: int = 4) -> dict[str, Prediction]:
    """Predicted forward + backward Newton-Schulz launches of intl_ops.kernels.newton_schulz at C variables,
    `views` views, T = iters, on each path: "rows" (row blocks) and "tiles" (triangle-tiled products)."""
    from intl_ops.kernels import _common, newton_schulz as ns

    def run():
        S = torch.empty(views, C, C)
        Ps = torch.empty(views, iters, C, C)
        powers = torch.empty(views, iters - 1, 2, C, C)
        ns.newton_schulz_fwd(S, Ps, powers)
        ns.newton_schulz_bwd(torch.empty(views, C, C), S, Ps, powers)

    out = {}
    for path, limit in (("rows", 10**9), ("tiles", 0)):
        with mock.patch.object(ns, "ROWS_MAX_C", limit), _common.assume_gpu(SMS):
            out[path] = plan_seconds(run, fake=True)
    return out


NS_CROSSOVER_SIZES = (64, 128, 192, 256, 320, 384, 448, 512)


def ns_crossover(sizes=NS_CROSSOVER_SIZES, views: int = 2, iters: int = 4) -> tuple[int, list[dict]]:
    """(the largest C of `sizes` up to which the row-block path is predicted no slower than the tiled
    one at every size, rows of the comparison): what newton_schulz.ROWS_MAX_C should be."""
    rows, crossover, rows_win = [], 0, True
    for C in sizes:
        p = newton_schulz_paths(C, views, iters)
        r, t = p["rows"].seconds, p["tiles"].seconds
        rows.append({"C": C, "rows_us": r * 1e6, "tiles_us": t * 1e6,
                     "rows_launches": p["rows"].count("triton"), "tiles_launches": p["tiles"].count("triton")})
        rows_win = rows_win and r <= t
        if rows_win:
            crossover = C
    return crossover, rows


# ------------------------------------------------------------------ 4. output
def providers_to_model(op: str, provider_filter) -> tuple[list[str], list[str]]:
    """(providers, notes): eager and every registered backend the recorder can run on CPU."""
    names, notes = [], []
    for p in P.providers_for(op):
        if provider_filter and p not in provider_filter:
            continue
        if p in NOT_MODELLED:
            notes.append(f"{p}: not modelled ({NOT_MODELLED[p]})")
        else:
            names.append(p)
    return names, notes


def _backend_reason(provider: str, case: Case) -> str | None:
    """Why the recorder cannot run a backend provider on this case (None: it can)."""
    if provider not in P.backend_providers():
        return None
    with Recorder().patched(fake=False):
        return P.runnable(case, provider, {provider: None}, torch.device("cpu"))


def model_rows(cases, modes, provider_filter, prov: dict, log=print
               ) -> tuple[list[dict], list[str], list[tuple[Case, str]]]:
    """Rows (one per case x mode x provider), notes, and the (case, provider) pairs modelled."""
    from intl_ops.kernels._common import torch_allows_tf32

    rows, notes, modelled = [], [], []
    for case in cases:
        names, skipped = providers_to_model(case.op, provider_filter)
        notes += [n for n in skipped if n not in notes]
        case_rows = []
        for provider in names:
            reason = _backend_reason(provider, case)
            if reason is not None:
                note = f"{provider}: not modelled ({reason})"
                notes += [note] if note not in notes else []
                continue
            for mode in modes:
                pred = predict(provider, case, mode)
                c = case.with_mode(mode)
                w = roofline.work(c.op, mode, c.m, c.d, c.axis, c.iters, c.k, c.dtype)
                floor = roofline.floor_seconds(w, roofline.H200, c.dtype, tf32=torch_allows_tf32())
                case_rows.append({**prov, **c.as_dict(), "provider": provider, "source": "model",
                                  "triton_launches": pred.count("triton"), "torch_launches": pred.count("torch"),
                                  "gflop": pred.flops / 1e9, "model_mb": pred.bytes / 2**20,
                                  "model_graph_ms": pred.device_s * 1e3, "model_host_ms": pred.host_s * 1e3,
                                  "model_ms": pred.seconds * 1e3, "floor_ms": floor * 1e3})
            modelled.append((case, provider))
            log(f"  model: {case.label()} {provider}")
        base = {r["mode"]: r["model_ms"] for r in case_rows if r["provider"] == P.baseline(case.op)}
        for r in case_rows:
            if r["mode"] in base:
                r["model_speedup"] = base[r["mode"]] / r["model_ms"]
        rows += case_rows
    return rows, notes, modelled


MODEL_COLUMNS = (("Triton", "triton_launches"), ("torch", "torch_launches"), ("GFLOP", "gflop"), ("MB", "model_mb"),
                 ("model graph ms", "model_graph_ms"), ("model host ms", "model_host_ms"), ("model ms", "model_ms"),
                 ("model speedup", "model_speedup"), ("floor ms", "floor_ms"))


def model_table(rows: list[dict]) -> str:
    head = ["case", "mode", "provider", *(name for name, _ in MODEL_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [report.case_label(r), r["mode"], r["provider"]]
        for _, key in MODEL_COLUMNS:
            v = r.get(key)
            cells.append(f"{v:.2f}x" if key == "model_speedup" and v is not None else report._fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(pred: Prediction, top: int = 15) -> str:
    """The launches of one prediction grouped by identical cost, slowest total device time first."""
    groups: Counter = Counter()
    for c in pred.breakdown:
        if c.device_s:
            groups[c] += 1
    lines = ["| n | kind | kernel / op | programs | waves | GFLOP | MB | precision | us each | us total |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[0].device_s * kv[1])
    for c, n in ranked[:top]:
        lines.append(f"| {n} | {c.kind} | {c.name} | {c.programs} | {c.waves} | {c.flops / 1e9:.3g} "
                     f"| {c.bytes / 2**20:.3g} | {c.precision} | {c.device_s * 1e6:.1f} | {c.device_s * n * 1e6:.1f} |")
    rest = ranked[top:]
    if rest:
        lines.append(f"| {sum(n for _, n in rest)} | ... | {len(rest)} more groups | | | | | | | "
                     f"{sum(c.device_s * n for c, n in rest) * 1e6:.1f} |")
    return "\n".join(lines)


def constants_text() -> str:
    return (f"model constants (bench/model.py): H200 {SMS} SMs, {HBM_BYTES_PER_S / 1e12:.1f} TB/s, peaks TFLOP/s "
            + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in PEAK_FLOPS.items())
            + f"; assumptions: kernel fixed {KERNEL_FIXED_S * 1e6:.1f} us, Triton GEMM efficiency "
              f"{TRITON_DOT_EFFICIENCY}, cuBLAS {CUBLAS_EFFICIENCY}, HBM saturates at {HBM_SATURATING_OCCUPANCY:.0%} "
              "occupancy, host us per "
            + ", ".join(f"{k} {v * 1e6:g}" for k, v in HOST_S.items()))


def comparison_table(rows: list[dict], measured: list[dict]) -> str:
    """Model rows next to measured rows of the same (case, mode, provider)."""
    got = {(report.case_label(r), r["mode"], r["provider"]): r for r in measured}
    lines = ["| case | mode | provider | model ms | measured median ms | model graph ms | measured graph ms "
             "| measured / model |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = got.get((report.case_label(r), r["mode"], r["provider"]), {})
        med = m.get("median_ms")
        ratio = f"{med / r['model_ms']:.2f}" if med else "-"
        lines.append(f"| {report.case_label(r)} | {r['mode']} | {r['provider']} | {report._fmt(r['model_ms'])} | "
                     f"{report._fmt(med) if med else m.get('status', '-')} | {report._fmt(r['model_graph_ms'])} | "
                     f"{report._fmt(m.get('graph_ms'))} | {ratio} |")
    return "\n".join(lines)


def _measure_here(args, cases, modes, provider_filter, log) -> list[dict]:
    """--measure: bench's own measurement of the same cases on this GPU."""
    from .runner import run_grid

    device = torch.device("cuda")
    peaks = roofline.device_peaks(device)
    measured, _ = run_grid(cases, modes, provider_filter, device, args, peaks, report.provenance(device), log=log)
    return measured


def measured_rows(path: str) -> tuple[list[dict], list[Case]]:
    """--compare F.jsonl: the measured GPU rows of a run (e.g. gpu_check's results/bench_headline/*.jsonl)
    and their cases."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("source") != "model" and str(r.get("device", "")).startswith("NVIDIA")]
    if not rows:
        raise SystemExit(f"--compare: {path} holds no measured GPU rows")
    fields = ("op", "m", "d", "axis", "iters", "k", "dtype")
    cases = list(dict.fromkeys(Case(**{f: r[f] for f in fields}) for r in rows))
    return rows, cases


def main(args, log=print) -> int:
    """python -m bench --model: the prediction table of the headline cases (bench/runner.py parses args)."""
    from .runner import _csv, select

    if args.save:
        raise SystemExit("--model rows are predictions: they are not filed into bench/results/ (--out DIR writes them)")
    if args.measure and not torch.cuda.is_available():
        raise SystemExit("--measure needs a GPU (without one: compare measured rows with model rows by case label)")
    if args.tf32:
        torch.set_float32_matmul_precision("high")  # torch GEMMs and the Triton kernels' "auto" use tf32
    measured = None
    if args.compare:
        measured, cases = measured_rows(args.compare)
        cases = select(cases, args)
    else:
        cases = select(list(HEADLINE_CASES), args)
    modes = _csv(args.modes) or list(P.MODES)
    provider_filter = _csv(args.providers)
    prov = {**report.provenance(torch.device("cpu")), "device": "NVIDIA H200 (model prediction)",
            "device_kind": "model"}
    rows, notes, modelled = model_rows(cases, modes, provider_filter, prov, log=log)
    parts = [f"# bench model: predicted NVIDIA H200 times (a model, not measurements), git {prov['git_sha']}", "",
             constants_text(), "", model_table(rows), "", *[f"- {n}" for n in notes]]
    if args.verbose:
        for case, provider in modelled:
            parts += ["", f"## model breakdown: {case.label()}, {provider}, full (fwd+bwd), by device time", "",
                      breakdown_table(predict(provider, case, "full"))]
    if args.verbose:
        crossover, ns_rows = ns_crossover()
        parts += ["", f"## model: Newton-Schulz forward + backward, 2 views, T = 4: row blocks vs triangle tiles "
                      f"(crossover C = {crossover}; intl_ops.kernels.newton_schulz.ROWS_MAX_C)", "",
                  "| C | rows us | tiles us | rows launches | tiles launches |", "|---|---|---|---|---|",
                  *[f"| {r['C']} | {r['rows_us']:.0f} | {r['tiles_us']:.0f} | {r['rows_launches']} | "
                    f"{r['tiles_launches']} |" for r in ns_rows]]
    if args.measure:
        measured = _measure_here(args, cases, modes, sorted({p for _, p in modelled}), log)
    if measured is not None:
        where = f"measured in {args.compare}" if args.compare else "measured on this GPU"
        parts += ["", f"## model vs {where}", "", comparison_table(rows, measured)]
    text = "\n".join(parts)
    print(text)
    if not args.no_files:
        stem = report.run_stem(prov, "model")
        folder = report.run_dir(stem, args.out)
        report.append_jsonl(folder / f"{stem}.jsonl", rows)
        (folder / f"{stem}.md").write_text(text + "\n")
        log(f"files: {folder}/ ({stem}.jsonl, {stem}.md)")
    return 0
