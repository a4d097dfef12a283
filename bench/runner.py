"""The one runner: grids of cases, every provider through the same modes, timers, memory and roofline.

    python -m bench --quick          small CPU grid (< 2 minutes on 2 cores)
    python -m bench                  the full grid on a GPU (the quick grid without one)
    python -m bench --whiten         whitening: iternorm / zca / cholesky at C = 128 .. 4096
    python -m bench --foundation     reference backend vs the literal code, CPU (bench/foundation_cpu.py)
    python -m bench --profile        launches and device time per provider instead of timings
    python -m bench --table F.jsonl  re-render the table and plot of saved rows
    python -m bench --model          predicted H200 times of the headline cases (bench/model.py; no GPU needed)
Every run writes into a new git-ignored folder bench/out/<date>_<device>_<grid>/ (--out DIR: there);
--save also files the run into bench/results/ (tracked). See bench/README.md for how to read the table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from . import foundation_cpu, model, report, roofline
from . import providers as P
from .measure import add_speedups, measure, mode_calls
from .plotting import plot
from .profiling import profile_call
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
    """The whitening comparison: C variables from N = 2C observations (axis=1, x is (2C, C)).
    C = 4096 needs a GPU (one eigh of 4096^2 takes tens of seconds on 2 CPU cores)."""
    sizes = (128, 256, 1024, 4096) if device.type == "cuda" else (128, 256, 1024)
    return [Case("whiten", 2 * c, c, axis=1) for c in sizes]


def headline_grid(device: torch.device) -> list[Case]:
    """The reference defaults users run: intl_loss (2 views and 6 crops) and iternorm at per-view
    m=256, d=8192, axis=0, T=4, and iternorm / intl_loss at m=256, d=1024, axis=1; bf16 and fp32."""
    return [c for dt in ("bf16", "fp32") for c in (
        Case("intl_loss", 256, 8192, axis=0, k=2, dtype=dt), Case("iternorm", 256, 8192, axis=0, dtype=dt),
        Case("intl_loss", 256, 8192, axis=0, k=6, dtype=dt), Case("iternorm", 256, 1024, axis=1, dtype=dt),
        Case("intl_loss", 256, 1024, axis=1, k=2, dtype=dt))]


def full_grid(device: torch.device) -> list[Case]:
    """Everything, most important first (a time budget cuts from the end):
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


# ------------------------------------------------------------------ the grid
def run_grid(cases: list[Case], modes, provider_filter, device: torch.device, opts, peaks: dict, prov: dict,
             on_rows=None, log=print) -> tuple[list[dict], list[str]]:
    """Every case x provider x mode; returns (rows, notes). Rows of one case reach `on_rows` as soon
    as it is done, so a run cut short by a timeout keeps what it measured."""
    status = P.provider_status(device, allow_interpreter=opts.allow_interpreter)
    rows: list[dict] = []
    notes: list[str] = []
    skipped_budget = 0
    start = time.perf_counter()
    for case in cases:
        names = [p for p in P.providers_for(case.op) if provider_filter is None or p in provider_filter]
        case_rows = []
        for provider in names:
            reason = P.runnable(case, provider, status, device)
            if reason is not None:
                where = "" if status.get(provider) is not None else f" for {case.label()}"
                note = f"{provider} skipped{where}: {reason}"
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
                    if opts.verbose:
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


# ------------------------------------------------------------------ profile mode
def run_profile(cases, modes, provider_filter, device, opts, log=print) -> str:
    status = P.provider_status(device, allow_interpreter=opts.allow_interpreter)
    lines = ["| case | mode | provider | launches | device ms | counted | trace |", "|---|---|---|---|---|---|---|"]
    for case in cases:
        for provider in P.providers_for(case.op):
            if (provider_filter and provider not in provider_filter) or P.runnable(case, provider, status, device):
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
    g.add_argument("--full", action="store_true", help="the full grid (the default with a GPU)")
    g.add_argument("--whiten", action="store_true", help="whitening methods only: iternorm vs zca vs cholesky")
    g.add_argument("--tiny", action="store_true", help="tiny shapes: the harness's own tests")
    g.add_argument("--grid", choices=sorted(GRIDS), help="a grid by name (the flags above are shortcuts)")
    g.add_argument("--foundation", action="store_true",
                   help="the foundation CPU benchmark: reference backend vs literal code (bench/foundation_cpu.py)")
    g.add_argument("--model", action="store_true",
                   help="predicted H200 times of the headline cases from the launches the code makes, no GPU needed "
                        "(bench/model.py; -v: per-launch breakdown; --ops/--dtypes/--providers/--modes filter)")
    g.add_argument("--measure", action="store_true",
                   help="with --model on a GPU: also measure the same cases and print measured next to predicted")
    g.add_argument("--compare", metavar="F.jsonl",
                   help="with --model: the model for the cases of measured GPU rows (a run's .jsonl, e.g. from "
                        "bench/gpu_check.sh), printed next to them")
    g.add_argument("--ops", help=f"comma list of ops to keep, of {','.join(P.OPS)}")
    g.add_argument("--providers", help=f"comma list of providers to keep, of {','.join(P.all_providers())}")
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
    o = report.add_output_args(p)
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--profile", action="store_true",
                   help="print launch counts and device time instead of timings (no files but the traces)")
    o.add_argument("--trace-dir", help="with --profile: write a Chrome trace per call here")
    o.add_argument("--table", metavar="F.jsonl",
                   help="re-render the table and plot of a run's saved rows (into the output folder; with --save, "
                        "file them into bench/results/, e.g. the rows a GPU run brought back) and exit")
    o.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failing rows")
    return p.parse_args(argv)


def select(cases: list[Case], args) -> list[Case]:
    ops, dtypes = _csv(args.ops), _csv(args.dtypes)
    return [c for c in cases if (ops is None or c.op in ops) and (dtypes is None or c.dtype in dtypes)]


def finish_run(args, stem: str, text: str, rows: list[dict], folder: Path | None, log) -> None:
    """Write the table (and plot) next to the run's rows, say where the files are, and --save them."""
    if folder is None:
        return
    files = [folder / f"{stem}.jsonl", folder / f"{stem}.md"]
    files[1].write_text(text + "\n")
    if not args.no_plot:
        png = plot(rows, folder / f"{stem}.png")
        if png is not None:
            files.append(png)
    files = [f for f in files if f.exists()]
    log(f"files: {folder}/ ({', '.join(f.name for f in files)})")
    if args.save:
        saved = report.save_run(files, rows)
        log(f"saved: {', '.join(str(f) for f in saved)} (commit them)")


def render_table(args, log) -> int:
    """--table F.jsonl: the table (stdout) and, unless --no-files, F, the table and the plot in a run folder."""
    src = Path(args.table)
    rows = report.read_jsonl(src)
    text = report.markdown_table(rows)
    print(text)
    folder = None if args.no_files else report.run_dir(src.stem, args.out)
    if folder is not None and (folder / src.name).resolve() != src.resolve():
        shutil.copy2(src, folder / src.name)
    finish_run(args, src.stem, text, rows, folder, log)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731  (progress; the table goes to stdout)
    if args.table:
        return render_table(args, log)
    if (args.measure or args.compare) and not args.model:
        raise SystemExit("--measure and --compare go with --model")
    if args.model:
        return model.main(args, log)
    if args.foundation:
        return foundation_cpu.main(["--threads", str(args.threads or 1)] + (["--out", args.out] if args.out else [])
                                   + (["--save"] if args.save else []) + (["--no-files"] if args.no_files else []))

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

    if args.profile:
        print(run_profile(cases, modes, provider_filter, device, args, log=log))
        return 0

    prov = report.provenance(device)
    log(f"measuring peaks on {prov['device']} ...")
    peaks = roofline.device_peaks(device, quick=grid_name in ("quick", "tiny"))
    stem = report.run_stem(prov, grid_name)
    folder = None if args.no_files else report.run_dir(stem, args.out)
    if folder is not None:
        log(f"writing into {folder}/")

    def on_rows(rows):  # appended as each case finishes: a timeout keeps what was measured
        if folder is not None:
            report.append_jsonl(folder / f"{stem}.jsonl", rows)

    rows, notes = run_grid(cases, modes, provider_filter, device, args, peaks, prov, on_rows=on_rows, log=log)
    text = "\n".join([f"# bench {grid_name}", "", report.header(prov, peaks), "", report.markdown_table(rows), "",
                      *[f"- {n}" for n in notes]])
    print(text)
    finish_run(args, stem, text, rows, folder, log)
    return 0
