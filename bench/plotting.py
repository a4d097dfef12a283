"""The PNG of a run: speedup over the baseline per case and provider, and time vs size on log axes."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from .report import case_label


def plot(rows: Sequence[dict], path: Path, mode: str = "full") -> Path | None:
    """Left: speedup vs the baseline (eager; zca for whiten) of every `mode` row, grouped by case.
    Right: median time vs the number of whitened variables C, log-log, per (op, provider, dtype).
    Returns the path, or None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("median_ms") is not None]
    sel = [r for r in done if r["mode"] == mode] or done
    if not sel:
        return None
    cases = list(dict.fromkeys(case_label(r) + ("" if r["mode"] == mode else f" {r['mode']}") for r in sel))
    providers = list(dict.fromkeys(r["provider"] for r in sel))
    speed = {(case_label(r) + ("" if r["mode"] == mode else f" {r['mode']}"), r["provider"]): r.get("speedup")
             for r in sel}

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(12, 0.55 * len(cases) * max(1, len(providers)) / 2), 6))
    width = 0.8 / max(1, len(providers))
    for j, p in enumerate(providers):
        xs = [i + j * width for i, c in enumerate(cases) if speed.get((c, p)) is not None]
        ys = [speed[(c, p)] for c in cases if speed.get((c, p)) is not None]
        ax1.bar(xs, ys, width=width, label=p)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax1.set_xticklabels(cases, rotation=75, ha="right", fontsize=7)
    ax1.set_ylabel("speedup vs baseline (higher is better)")
    ax1.set_title(f"{mode}: speedup over eager (whiten: over zca)")
    ax1.legend(fontsize=7)

    series = defaultdict(dict)  # one line per everything-but-C: (op, K, T, axis, N, provider, dtype)
    for r in sel:
        C, N = (r["m"], r["d"]) if r["axis"] == 0 else (r["d"], r["m"])
        key = (r["op"], r["k"], r["iters"], r["axis"], N, r["provider"], r["dtype"])
        series[key][C] = r["median_ms"]
    for (op, k, T, axis, N, p, dt), pts in sorted(series.items()):
        if len(pts) >= 2:
            cs = sorted(pts)
            views = f" K={k}" if op == "intl_loss" else ""
            ax2.plot(cs, [pts[c] for c in cs], marker="o", label=f"{op}{views} ax{axis} N={N} T{T} {p} {dt}")
    if not ax2.lines:
        ax2.text(0.5, 0.5, "no size sweep in this grid", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("C (variables whitened: m for axis=0, d for axis=1)")
    ax2.set_ylabel("median time (ms)")
    ax2.set_title(f"{mode}: time vs size")
    if ax2.lines:
        ax2.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
