"""Provenance, the markdown table, and the files of a run.

Every run writes into its own folder under OUT (bench/out/, git-ignored): nothing a run writes is
tracked unless asked for. `save_run` (the `--save` flag) copies a run's files into RESULTS
(bench/results/, tracked) and appends its rows to RESULTS/rows.{csv,jsonl}."""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"  # tracked: only what --save puts there
OUT = Path(__file__).resolve().parent / "out"           # git-ignored: every run's own folder

# Every row carries these (the provenance), then the case, then the measurements.
PROVENANCE_KEYS = ("date", "device", "device_kind", "torch", "triton", "cuda", "python", "git_sha", "threads")
CASE_KEYS = ("op", "m", "d", "axis", "iters", "k", "dtype", "mode", "provider")
MEASURE_KEYS = ("status", "median_ms", "p20_ms", "p80_ms", "reps", "graph_ms", "peak_mb", "gflop", "min_mb",
                "floor_ms", "x_floor", "speedup", "first_call_s")
CSV_KEYS = PROVENANCE_KEYS + CASE_KEYS + MEASURE_KEYS


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores)"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": name,
        "device_kind": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "threads": torch.get_num_threads(),
    }


def slug(text: str) -> str:
    """A file-name-safe short form of a device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    text = re.sub(r"\(.*?\)", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def run_stem(prov: dict, grid: str) -> str:
    """<date>_<device>_<grid>: the file name of one run's results."""
    day = prov["date"][:16].replace(":", "").replace("T", "-")
    return f"{day}_{slug(prov['device'])}_{grid}"


# ------------------------------------------------------------------ the table
def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


TABLE_COLUMNS = (
    ("case", None), ("mode", "mode"), ("provider", "provider"), ("median ms", "median_ms"),
    ("p20-p80 ms", None), ("graph ms", "graph_ms"), ("peak MB", "peak_mb"), ("GFLOP", "gflop"),
    ("min MB", "min_mb"), ("floor ms", "floor_ms"), ("x floor", "x_floor"), ("speedup", "speedup"),
)


def case_label(row: dict) -> str:
    views = f" K={row['k']}" if row["op"] == "intl_loss" else ""
    return f"{row['op']} {row['m']}x{row['d']} ax{row['axis']} T{row['iters']}{views} {row['dtype']}"


def markdown_table(rows: Iterable[dict]) -> str:
    """One line per (case, mode, provider); failed or skipped rows show their reason."""
    lines = ["| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for r in rows:
        cells = []
        for name, key in TABLE_COLUMNS:
            if name == "case":
                cells.append(case_label(r))
            elif name == "p20-p80 ms":
                cells.append(f"{_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))}" if r.get("median_ms") is not None else "-")
            elif key == "median_ms" and r.get("median_ms") is None:
                cells.append(str(r.get("status", "-")).replace("|", "/")[:90])
            elif key in ("speedup", "x_floor"):
                cells.append(f"{r[key]:.2f}x" if isinstance(r.get(key), float) else "-")
            else:
                cells.append(_fmt(r.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(prov: dict, peaks: dict) -> str:
    def rate(key, unit, scale):
        return f"{peaks[key] / scale:.3g} {unit}" if isinstance(peaks.get(key), (int, float)) else "-"
    return (f"device: {prov['device']} | torch {prov['torch']} | triton {prov['triton']} | CUDA {prov['cuda']} | "
            f"git {prov['git_sha']} | {prov['date']} | threads {prov['threads']}\n"
            f"peaks ({peaks.get('method', '')}): fp32 {rate('fp32', 'TFLOP/s', 1e12)}, "
            f"bf16 {rate('bf16', 'TFLOP/s', 1e12)}, tf32 {rate('tf32', 'TFLOP/s', 1e12)}, "
            f"memory {rate('bytes_per_s', 'GB/s', 1e9)}")


# ------------------------------------------------------------------ files
def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append rows (a header is written when the file is new); unknown keys go to JSON only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_KEYS})


def append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ run folders and --save
def run_dir(stem: str, out: str | Path | None = None, root: Path | None = None) -> Path:
    """The folder a run writes into: `out` when given (created if missing), else a new folder
    <root>/<stem> (root: OUT), with a -2, -3, ... suffix when a run of the same minute has one."""
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = OUT if root is None else Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path, n = root / stem, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = root / f"{stem}-{n}"


def save_run(files: Sequence[Path], rows: Sequence[dict], results: Path | None = None) -> list[Path]:
    """Copy a run's files into `results` (RESULTS: bench/results/, tracked) under their own names
    (<date>_<device>_<grid>.<ext>) and append its rows to results/rows.{csv,jsonl}. Refuses (before
    copying anything) when a file of that name is already there: the run was saved before."""
    results = RESULTS if results is None else Path(results)
    targets = [results / Path(f).name for f in files]
    taken = [str(t) for t in targets if t.exists()]
    if taken:
        raise FileExistsError(f"already in {results}, not saved again: {', '.join(taken)}")
    results.mkdir(parents=True, exist_ok=True)
    for f, t in zip(files, targets):
        shutil.copy2(f, t)
    append_csv(results / "rows.csv", rows)
    append_jsonl(results / "rows.jsonl", rows)
    return targets + [results / "rows.csv", results / "rows.jsonl"]


def add_output_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--out, --save, --no-files: the same for every benchmark of bench/ (see report.run_dir, save_run)."""
    o = p.add_argument_group("output (default: a new folder bench/out/<date>_<device>_<grid>/, git-ignored)")
    o.add_argument("--out", help="write this run's files into DIR instead (created if missing)", metavar="DIR")
    files = o.add_mutually_exclusive_group()
    files.add_argument("--save", action="store_true",
                       help="also copy the run's files into bench/results/ (tracked; commit them) and append its rows "
                            "to bench/results/rows.{csv,jsonl}")
    files.add_argument("--no-files", action="store_true", help="print only: write no file")
    return o
