"""The one runner: grids of cases, every provider through the same modes, timers, memory and roofline.

    python -m bench --quick          small CPU grid (< 2 minutes on 2 cores)
    python -m bench                  the full grid on a GPU (the quick grid without one)
    python -m bench --whiten         issue 7: iternorm / zca / cholesky whitening at C = 128 .. 4096
    python -m bench --foundation     issue 2's CPU benchmark (bench/foundation_cpu.py)
    python -m bench --profile        launches and device time per provider instead of timings
    python -m bench --table F.jsonl  re-render the table and plot of saved rows
See bench/README.md for how to read the table.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from . import providers as P
from . import report, roofline, timing
from .providers import Case

# ------------------------------------------------------------------ grids
AXIS1_D = (512, 1024, 2048, 4096)


def quick_grid() -> list[Case]:
    """Small CPU shapes: every op, both axes, K = 2 and the 6-crop setting, fp32."""
    return [
        Case("iternorm", 64, 512, axis=0),
        Case("iternorm", 256, 128, axis=1),
        Case("trace_loss", 128, 512, axis=0),
        Case("intl_loss", 64, 512, axis=0, k=2),
        Case("intl_loss", 64, 256, axis=0, k=6),
        Case("whiten", 256, 128, axis=1),
    ]


def tiny_grid() -> list[Case]:
    """Seconds, not minutes: the harness's own tests (tests/test_bench.py)."""
    return [Case("iternorm", 12, 40, axis=0), Case("iternorm", 40, 12, axis=1, iters=5), Case("trace_loss", 12, 40),
            Case("intl_loss", 12, 40, axis=0, k=2), Case("intl_loss", 40, 12, axis=1, k=6), Case("whiten", 40, 12, axis=1)]


def whiten_grid(device: torch.device) -> list[Case]:
    """Issue 7: whitening of C variables from N = 2C observations (axis=1, x is (2C, C)).
    C = 4096 needs a GPU (one eigh of 4096^2 takes tens of seconds on 2 CPU cores)."""
    sizes = (128, 256, 1024, 4096) if device.type == "cuda" else (128, 256, 1024)
    return [Case("whiten", 2 * c, c, axis=1, dtype=dt) for dt in ("fp32",) for c in sizes]


def headline_grid(device: torch.device) -> list[Case]:
    """The reference defaults users run: intl_loss (2 views and 6 crops) and iternorm at per-view
    m=256, d=8192, axis=0, T=4, and iternorm / intl_loss at m=256, d=1024, axis=1; bf16 and fp32."""
    return [c for dt in ("bf16", "fp32") for c in (
        Case("intl_loss", 256, 8192, axis=0, k=2, dtype=dt), Case("iternorm", 256, 8192, axis=0, dtype=dt),
        Case("intl_loss", 256, 8192, axis=0, k=6, dtype=dt), Case("iternorm", 256, 1024, axis=1, dtype=dt),
        Case("intl_loss", 256, 1024, axis=1, k=2, dtype=dt))]


def full_grid(device: torch.device) -> list[Case]:
    """The issue's grid, most important first (a time budget cuts from the end):
    the reference defaults (per view m=256, d=8192, axis=0, T=4) for intl_loss (2 views, 6 crops)
    and iternorm, then axis=1 at d in {512..4096} with m in {256, 512}, m in {512, 1024}, T=5,
    trace_loss, whitening."""
    cases: list[Case] = []
    dtypes = ("bf16", "fp32")
    for dt in dtypes:
        cases += [Case("intl_loss", 256, 8192, axis=0, k=2, dtype=dt), Case("iternorm", 256, 8192, axis=0, dtype=dt),
                  Case("intl_loss", 256, 8192, axis=0, k=6, dtype=dt)]
    for dt in dtypes:
        for m in (256, 512):
            for d in AXIS1_D:
                cases += [Case("iternorm", m, d, axis=1, dtype=dt), Case("intl_loss", m, d, axis=1, k=2, dtype=dt)]
    for dt in dtypes:
        for m in (512, 1024):
            cases += [Case("iternorm", m, 8192, axis=0, dtype=dt), Case("intl_loss", m, 8192, axis=0, k=2, dtype=dt)]
    for dt in dtypes:  # T = 5
        cases += [Case("intl_loss", 256, 8192, axis=0, iters=5, k=2, dtype=dt),
                  Case("iternorm", 256, 8192, axis=0, iters=5, dtype=dt),
                  Case("iternorm", 256, 1024, axis=1, iters=5, dtype=dt),
                  Case("iternorm", 512, 4096, axis=1, iters=5, dtype=dt)]
    for dt in dtypes:
        cases += [Case("trace_loss", 256, 8192, axis=0, dtype=dt), Case("trace_loss", 512, 4096, axis=1, dtype=dt)]
    cases += whiten_grid(device)
    return cases


GRIDS = {"quick": lambda device: quick_grid(), "tiny": lambda device: tiny_grid(), "whiten": whiten_grid,
         "headline": headline_grid, "full": full_grid}


# ------------------------------------------------------------------ one row
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mode_calls(fwd, xs: list[torch.Tensor], mode: str):
    """The zero-argument call that `mode` times, for the forward `fwd` on views `xs`."""
    out = fwd(xs)
    dy = None if out.dim() == 0 else torch.randn_like(out)  # scalars: backward() of the loss itself
    if mode == "forward":
        return lambda: fwd(xs)
    if mode == "backward":
        return lambda: out.backward(dy, retain_graph=True)
    if mode == "full":
        return lambda: fwd(xs).backward(dy)
    raise ValueError(f"mode must be one of {P.MODES}, got {mode!r}")


def rotation_copies(case: Case, device: torch.device) -> int:
    """How many input copies to cycle through on a GPU so they cannot all sit in L2 (2x L2 in all)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    nbytes = case.k * case.m * case.d * torch.tensor([], dtype=P.DTYPES[case.dtype]).element_size()
    return int(min(8, max(1, math.ceil(2 * l2 / nbytes))))


class Options(argparse.Namespace):
    target_s: float = 0.5
    min_reps: int = 5
    graph_below_ms: float = 1.0
    tf32: bool = False
    memory: bool = True


def measure(case: Case, provider: str, fwd, device: torch.device, opts, peaks: dict) -> dict:
    """Time one (case, provider) and fill the measurement columns of its row."""
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
    _sync(device)
    row["first_call_s"] = round(time.perf_counter() - t0, 4)  # includes compilation for `compiled`
    if device.type == "cuda":
        t = timing.time_gpu(fn, leaves, warmup_ms=getattr(opts, "warmup_ms", 25), rep_ms=getattr(opts, "rep_ms", 100))
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


def run_grid(cases: list[Case], modes, provider_filter, device: torch.device, opts, peaks: dict, prov: dict,
             on_rows=None, log=print) -> tuple[list[dict], list[str]]:
    """Every case x provider x mode; returns (rows, notes). Rows of one case reach `on_rows` as soon
    as it is done, so a run cut short by a timeout keeps what it measured."""
    status = P.provider_status(device, allow_interpreter=getattr(opts, "allow_interpreter", False))
    rows: list[dict] = []
    notes: list[str] = []
    skipped_budget = 0
    start = time.perf_counter()
    for case in cases:
        names = [p for p in P.providers_for(case.op) if provider_filter is None or p in provider_filter]
        case_rows = []
        for provider in names:
            reason = P.runnable(case.op, provider, status)
            if reason is not None:
                note = f"{provider} skipped: {reason}"
                if note not in notes:
                    notes.append(note)
                continue
            fwd = None
            for mode in modes:
                if opts.time_budget and time.perf_counter() - start > opts.time_budget:
                    skipped_budget += 1
                    continue
                c = case.with_mode(mode)
                row = {**prov, **c.as_dict(), "provider": provider}
                try:
                    if fwd is None:
                        fwd = P.get_forward(c, provider)
                    row.update(measure(c, provider, fwd, device, opts, peaks))
                except Exception as exc:  # one failing provider never stops the grid
                    row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                    if getattr(opts, "verbose", False):
                        traceback.print_exc()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                log(f"  {c.label()} {mode:8s} {provider:10s} "
                    + (f"{row['median_ms']:.4g} ms" if row.get("median_ms") is not None else row["status"]))
                case_rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        add_speedups(case_rows)
        rows += case_rows
        if on_rows is not None and case_rows:
            on_rows(case_rows)
    if skipped_budget:
        notes.append(f"{skipped_budget} rows not run: time budget of {opts.time_budget:.0f} s reached")
    notes.append(f"grid time {time.perf_counter() - start:.1f} s")
    return rows, notes


def add_speedups(rows: list[dict]) -> None:
    """speedup = baseline median / row median, within one case and mode."""
    base = {(r["mode"]): r.get("median_ms") for r in rows if r["provider"] == P.baseline(r["op"])}
    for r in rows:
        b = base.get(r["mode"])
        if b and r.get("median_ms"):
            r["speedup"] = b / r["median_ms"]


# ------------------------------------------------------------------ profile mode
def run_profile(cases, modes, provider_filter, device, opts, log=print) -> str:
    from .profiling import profile_call

    status = P.provider_status(device, allow_interpreter=getattr(opts, "allow_interpreter", False))
    lines = ["| case | mode | provider | launches | device ms | counted | trace |", "|---|---|---|---|---|---|---|"]
    for case in cases:
        for provider in P.providers_for(case.op):
            if (provider_filter and provider not in provider_filter) or P.runnable(case.op, provider, status):
                continue
            fwd = P.get_forward(case, provider)
            for mode in modes:
                c = case.with_mode(mode)
                try:
                    xs = P.make_inputs(c, device)
                    trace = None
                    if opts.trace_dir:
                        trace = Path(opts.trace_dir) / f"{c.label().replace(' ', '_')}_{mode}_{provider}.json"
                    res = profile_call(mode_calls(fwd, xs, mode), device, xs, trace)
                    lines.append(f"| {c.label()} | {mode} | {provider} | {res['launches']} | {res['device_ms']:.3f} "
                                 f"| {res['what']} | {res.get('trace', '-')} |")
                except Exception as exc:
                    lines.append(f"| {c.label()} | {mode} | {provider} | - | - | error: {type(exc).__name__} | - |")
                log(f"  profiled {c.label()} {mode} {provider}")
    return "\n".join(lines)


# ------------------------------------------------------------------ CLI
def _csv(text: str | None) -> list[str] | None:
    return None if not text else [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--quick", action="store_true", help="small CPU grid (the default without a GPU)")
    g.add_argument("--full", action="store_true", help="the issue's full grid (the default with a GPU)")
    g.add_argument("--whiten", action="store_true", help="whitening methods only (issue 7)")
    g.add_argument("--tiny", action="store_true", help="tiny shapes: the harness's own tests")
    g.add_argument("--grid", choices=sorted(GRIDS), help="a grid by name (the flags above are shortcuts)")
    g.add_argument("--foundation", action="store_true", help="issue 2's CPU benchmark, reference vs literal")
    g.add_argument("--ops", help=f"comma list of ops to keep, of {','.join(P.OPS)}")
    g.add_argument("--providers", help=f"comma list of providers to keep, of {','.join(P.PROVIDERS + P.WHITEN_PROVIDERS)}")
    g.add_argument("--modes", default="forward,backward,full", help="comma list of forward,backward,full")
    g.add_argument("--dtypes", help="comma list of dtypes to keep (fp32,bf16)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t = p.add_argument_group("timing")
    t.add_argument("--target-s", type=float, default=None,
                   help="CPU: seconds of repeated calls per row (default 0.2 for --quick, else 1.0)")
    t.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default 1: on a shared machine, OpenMP threads that wait for a "
                        "descheduled sibling make multi-threaded timings meaningless; peaks use the same count)")
    t.add_argument("--min-reps", type=int, default=5, help="CPU: fewest timed calls per row")
    t.add_argument("--warmup-ms", type=int, default=25, help="GPU: do_bench warm-up")
    t.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench measuring time per row")
    t.add_argument("--graph-below-ms", type=float, default=1.0,
                   help="GPU: rows faster than this also get a CUDA-graph replay time (launch-bound)")
    t.add_argument("--tf32", action="store_true", help="allow tf32 matmuls and use the tf32 peak for fp32 rows")
    t.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory call")
    t.add_argument("--time-budget", type=float, default=0.0, help="stop starting rows after this many seconds")
    t.add_argument("--allow-interpreter", action="store_true", help="time Triton under the CPU interpreter")
    o = p.add_argument_group("output")
    o.add_argument("--profile", action="store_true", help="launch counts and device time instead of timings")
    o.add_argument("--trace-dir", help="with --profile: write a Chrome trace per call here")
    o.add_argument("--results-dir", default=str(report.RESULTS), help="where rows and per-run files go")
    o.add_argument("--no-save", action="store_true", help="print only")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--table", help="re-render the table (and plot) of a saved rows .jsonl file and exit")
    o.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failing rows")
    return p.parse_args(argv)


def select(cases: list[Case], args) -> list[Case]:
    ops, dtypes = _csv(args.ops), _csv(args.dtypes)
    return [c for c in cases if (ops is None or c.op in ops) and (dtypes is None or c.dtype in dtypes)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        rows = report.read_jsonl(Path(args.table))
        print(report.markdown_table(rows))
        if not args.no_plot:
            print("plot:", __import__("bench.plotting", fromlist=["plot"]).plot(rows, Path(args.table).with_suffix(".png")))
        return 0
    if args.foundation:
        from .foundation_cpu import main as foundation_main
        return foundation_main(["--results-dir", args.results_dir, "--threads", str(args.threads or 1)]
                               + (["--no-save"] if args.no_save else []))

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    P.raise_dynamo_limits()
    grid_name = args.grid or next((name for name in ("tiny", "whiten", "full", "quick") if getattr(args, name)),
                                  "full" if device.type == "cuda" else "quick")
    cases = GRIDS[grid_name](device)
    cases = select(cases, args)
    if args.target_s is None:
        args.target_s = {"quick": 0.2, "tiny": 0.01}.get(grid_name, 1.0)
    modes = _csv(args.modes) or list(P.MODES)
    bad = [m for m in modes if m not in P.MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}, choose from {P.MODES}")
    provider_filter = _csv(args.providers)

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  (progress; the table goes to stdout)
    if args.profile:
        print(run_profile(cases, modes, provider_filter, device, args, log=log))
        return 0

    prov = report.provenance(device)
    log(f"measuring peaks on {prov['device']} ...")
    peaks = roofline.device_peaks(device, quick=grid_name in ("quick", "tiny"))
    results = Path(args.results_dir)
    stem = report.run_stem(prov, grid_name)
    save = not args.no_save

    def on_rows(rows):  # appended as each case finishes: a timeout keeps what was measured
        if save:
            report.append_csv(results / "rows.csv", rows)
            report.append_jsonl(results / "rows.jsonl", rows)
            report.append_jsonl(results / f"{stem}.jsonl", rows)

    rows, notes = run_grid(cases, modes, provider_filter, device, args, peaks, prov, on_rows=on_rows, log=log)
    text = "\n".join([f"# bench {grid_name}", "", report.header(prov, peaks), "", report.markdown_table(rows), "",
                      *[f"- {n}" for n in notes]])
    print(text)
    if save:
        (results / f"{stem}.md").write_text(text + "\n")
        if not args.no_plot:
            from .plotting import plot
            png = plot(rows, results / f"{stem}.png")
            log(f"plot: {png}")
        log(f"rows: {results / (stem + '.jsonl')} (also appended to rows.csv / rows.jsonl)")
    return 0
