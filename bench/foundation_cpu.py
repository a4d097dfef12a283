"""The foundation CPU benchmark: fwd+bwd of iternorm and intl_loss, reference backend vs the literal code.

    python -m bench --foundation [--save]   (or: python -m bench.foundation_cpu [--top-ops] [--save])

fp32, T = 4, at (m=256, d=2048, axis=0) and (m=256, d=1024, axis=1); intl_loss with 2 views.
Each row: median (p20-p80) of repeated full (forward + backward) calls with a monotonic clock, and
the extra peak memory of one call (torch's CPU allocator high-water mark above the level before the
call, from torch.profiler's allocation events; see bench/timing.py). The goal at axis=1: the
reference at least 1.2x faster and at most 0.8x the literal version's extra peak memory.
--top-ops prints where the time goes (torch.profiler, self CPU time per op) for each provider.
Files (<date>_<device>_foundation.{md,json}) go to a new git-ignored folder bench/out/<stem>/ (--out DIR:
there); --save also files them into bench/results/ (tracked).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import providers as P
from . import report, roofline
from .measure import add_speedups, measure, mode_calls
from .providers import Case

CASES = (
    Case("iternorm", 256, 2048, axis=0), Case("iternorm", 256, 1024, axis=1),
    Case("intl_loss", 256, 2048, axis=0, k=2), Case("intl_loss", 256, 1024, axis=1, k=2),
)
PROVIDERS = ("eager", "reference")  # eager = intl_ops.literal


def top_ops(case: Case, provider: str, n: int = 8) -> str:
    """torch.profiler's table of the ops with the most self CPU time in one full call."""
    from torch.profiler import ProfilerActivity, profile

    xs = P.make_inputs(case, torch.device("cpu"))
    call = mode_calls(P.get_forward(case, provider), xs, "full")
    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def summary_table(rows: list[dict]) -> str:
    lines = ["| op | shape (m x d) | axis | literal ms (p20-p80) | reference ms (p20-p80) | speedup "
             "| literal peak MB | reference peak MB | memory ratio | goal (axis=1: >= 1.2x, <= 0.8x) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_case: dict[tuple, dict] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["m"], r["d"], r["axis"]), {})[r["provider"]] = r
    for (op, m, d, axis), pr in by_case.items():
        lit, ref = pr.get("eager", {}), pr.get("reference", {})
        if lit.get("median_ms") is None or ref.get("median_ms") is None:
            lines.append(f"| {op} | {m} x {d} | {axis} | {lit.get('status', '-')} | {ref.get('status', '-')} | - | - | - | - | - |")
            continue
        speed = lit["median_ms"] / ref["median_ms"]
        mem = (ref["peak_mb"] / lit["peak_mb"]) if lit.get("peak_mb") and ref.get("peak_mb") is not None else None
        goal = "-"
        if axis == 1 and mem is not None:
            goal = "met" if speed >= 1.2 and mem <= 0.8 else "NOT met"
        lines.append(
            f"| {op} | {m} x {d} | {axis} | {lit['median_ms']:.1f} ({lit['p20_ms']:.1f}-{lit['p80_ms']:.1f}) "
            f"| {ref['median_ms']:.1f} ({ref['p20_ms']:.1f}-{ref['p80_ms']:.1f}) | {speed:.2f}x "
            f"| {lit['peak_mb']:.1f} | {ref['peak_mb']:.1f} | {mem:.2f} | {goal} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --foundation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    p.add_argument("--min-reps", type=int, default=7)
    p.add_argument("--target-s", type=float, default=4.0, help="seconds of repeated calls per row")
    p.add_argument("--top-ops", action="store_true", help="also print the ops that take the time")
    report.add_output_args(p)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    opts = argparse.Namespace(target_s=args.target_s, min_reps=args.min_reps, graph_below_ms=0.0, tf32=False,
                              memory=True)
    prov = report.provenance(device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"measuring peaks on {prov['device']} ...")
    peaks = roofline.device_peaks(device)
    rows = []
    for case in CASES:
        case_rows = []
        for provider in PROVIDERS:
            row = {**prov, **case.as_dict(), "provider": provider}
            row.update(measure(case, provider, P.get_forward(case, provider), device, opts, peaks))
            log(f"  {case.label()} {provider}: {row['median_ms']:.1f} ms, peak {row['peak_mb']:.1f} MB")
            case_rows.append(row)
        add_speedups(case_rows)
        rows += case_rows
    text = "\n".join([
        "# Foundation CPU benchmark: reference backend vs literal autograd, fp32, T=4, fwd+bwd",
        "", report.header(prov, peaks), "",
        "Times: median (p20-p80) of repeated full calls, perf_counter; peak: extra bytes of torch's CPU allocator",
        "during one call (torch.profiler allocation events). speedup = literal / reference time; memory ratio =",
        "reference / literal extra peak.", "", summary_table(rows), "",
        "Full rows (with roofline columns):", "", report.markdown_table(rows)])
    print(text)
    if args.top_ops:
        for case in CASES:
            for provider in PROVIDERS:
                print(f"\n## where the time goes: {case.label()} {provider}\n```\n{top_ops(case, provider)}```")
    if not args.no_files:
        stem = report.run_stem(prov, "foundation")
        folder = report.run_dir(stem, args.out)
        files = [folder / f"{stem}.md", folder / f"{stem}.json"]
        files[0].write_text(text + "\n")
        files[1].write_text(json.dumps({"provenance": prov, "peaks": peaks, "rows": rows}, indent=1, sort_keys=True)
                            + "\n")
        log(f"files: {folder}/ ({', '.join(f.name for f in files)})")
        if args.save:
            log(f"saved: {', '.join(str(f) for f in report.save_run(files, rows))} (commit them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
