"""Newton-Schulz alone: the CUDA backend's one-launch kernels vs the Triton backend's vs the torch loop.

    python bench/ns_compare.py [--sizes 64,128,256] [--views 2] [--iters 4] [--out DIR]

The project's goal: CUDA NS at least 1.5x faster than Triton NS. For each C, on `views` matrices
(S = Sigma / tr(Sigma), Sigma the covariance of N = --n random observations), T = --iters:
  forward   cuda:   torch.ops.intl_cuda.ns_fwd(Sigma, T)   (one launch: S, tr, P_1..P_T, P_k^2, P_k^3, v)
            triton: intl_ops.kernels.newton_schulz.newton_schulz_fwd(S, Ps, powers) with Ps[:, 0] = P_1 = 1.5 I - 0.5 S
                    given (as intl_ops/backend_triton.py calls it: P_1 comes from the covariance kernel)
            torch:  the reference backend's stages (intl_ops.reference.newton_schulz_fwd), from Sigma (the scope of ns_fwd)
  backward  cuda:   torch.ops.intl_cuda.ns_bwd(Wbar, S, tr, Ps, powers, T, N) -> M = (Sigmabar + Sigmabar^T)/(N-1)
            triton: newton_schulz_bwd(G, S, Ps, powers) -> (Sbar, <Sbar, S> partials) (kernels only; G = Wbar / sqrt(tr)), and
                    "triton+glue": the kernels inside intl_ops.reference.covariance_grad, as
                    intl_ops/backend_triton.py runs them (the same scope as ns_bwd)
            torch:  reference.newton_schulz_bwd and sigma_grad (the scope of ns_bwd)
The CUDA forward does more than the Triton one (S, tr, P_1 and v too), so its ratio is conservative.
Timing: GPU, triton.testing.do_bench (CUDA events, L2 flushed before each call), median / p20 / p80
over --rep-ms; CPU (TRITON_INTERPRET=1, the dry run of bench/gpu_check.sh), perf_counter over --reps
calls: those numbers only show that the code runs. Every variant's output is checked against the
float64 torch stages first (max |error| / max |value|). Writes ns_compare.md / ns_compare.json to --out,
with bench.report's provenance (date, device, versions, git SHA).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors only under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import provenance  # noqa: E402
from bench.timing import time_cpu, time_gpu  # noqa: E402
from intl_ops import reference  # noqa: E402


# ------------------------------------------------------------------ the torch scope of ns_fwd / ns_bwd (also the fp64 oracle)
def torch_ns_fwd(sigma: torch.Tensor, iters: int):
    """What ns_fwd computes, with the reference backend's stages: S, tr, Ps, powers, v = diag(P_T S P_T)."""
    S, tr = reference.trace_normalise(sigma.clone())
    Ps, powers = reference.newton_schulz_fwd(S, iters)
    P = Ps[:, iters - 1]
    v = (torch.bmm(P, S) * P).sum(-1)
    return S, tr, Ps, powers, v


def torch_ns_bwd(wbar, S, tr, Ps, powers, iters: int, n_obs: int):
    """What ns_bwd computes, with the reference backend's stages: (Sbar, M = (Sigmabar + Sigmabar^T) / (N-1))
    with G = Wbar / sqrt(tr) through the T steps."""
    G = wbar * reference.guarded_power(tr, -0.5)[:, None, None]
    kept = {}

    def sbar_from(G):
        kept["Sbar"] = reference.newton_schulz_bwd(G, S, Ps, powers, iters)
        return kept["Sbar"].clone()

    M = reference.covariance_grad(G, S, tr, Ps[:, iters - 1], n_obs, sbar_from)
    return kept["Sbar"], M


def triton_chain(G, S, tr, Ps, powers, n_obs: int):
    """M from G as intl_ops/backend_triton.py computes it: the reference's chain around the kernels."""
    from intl_ops.kernels.newton_schulz import newton_schulz_bwd

    return reference.covariance_grad(G, S, tr, Ps[:, -1], n_obs, lambda G: newton_schulz_bwd(G, S, Ps, powers)[0])


def rel_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    oracle = oracle.double()
    return ((out.double() - oracle).abs().max() / oracle.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ timing
def timer(device: torch.device, rep_ms: int, reps: int):
    """bench.timing's timers in microseconds: do_bench on a GPU, `reps` perf_counter calls on CPU."""
    def run(fn):
        t = time_gpu(fn, warmup_ms=max(10, rep_ms // 4), rep_ms=rep_ms) if device.type == "cuda" else \
            time_cpu(fn, warmup=1, min_reps=max(1, reps), max_reps=max(1, reps))
        return {"median_us": t.median_ms * 1e3, "p20_us": t.p20_ms * 1e3, "p80_us": t.p80_ms * 1e3}
    return run


def cuda_status(device: torch.device) -> str | None:
    """None when torch.ops.intl_cuda can run here, else why not."""
    if device.type != "cuda":
        return "no GPU (the CUDA kernels run on CUDA tensors only)"
    try:  # never compiles here: the extension is loaded at import with INTL_OPS_JIT=1 (gpu_check.sh's build step)
        from intl_ops import backend_cuda
        return backend_cuda.unavailable_reason(device)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def triton_status(device: torch.device) -> str | None:
    try:
        from intl_ops import backend_triton
        return backend_triton.unavailable_reason(device)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ one C
def compare(C: int, args, device: torch.device, time_it) -> list[dict]:
    B, T, N = args.views, args.iters, args.n or max(4 * C, 256)
    g = torch.Generator(device=device).manual_seed(C)
    a = torch.randn(B, N, C, device=device, generator=g)
    ac = a - a.mean(1, keepdim=True)
    sigma = (ac.mT @ ac / (N - 1)).contiguous()
    wbar = torch.randn(B, C, C, device=device, generator=g)
    S64, tr64, Ps64, Pp64, _ = torch_ns_fwd(sigma.double(), T)
    Sbar64, M64 = torch_ns_bwd(wbar.double(), S64, tr64, Ps64, Pp64, T, N)
    S, tr, Ps, powers = (t.float().contiguous() for t in (S64, tr64, Ps64, Pp64))
    G = (wbar / tr.sqrt()[:, None, None]).contiguous()
    rows = []

    def add(direction, impl, fn, err):
        row = {"C": C, "views": B, "iters": T, "n_obs": N, "direction": direction, "impl": impl}
        try:
            row["err"] = err()
            row.update(time_it(fn))
        except Exception as exc:  # noqa: BLE001  (one failing variant never stops the table)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        rows.append(row)

    # torch loop (fp32)
    add("fwd", "torch", lambda: torch_ns_fwd(sigma, T), lambda: rel_err(torch_ns_fwd(sigma, T)[2][:, -1], Ps64[:, -1]))
    add("bwd", "torch", lambda: torch_ns_bwd(wbar, S, tr, Ps, powers, T, N),
        lambda: rel_err(torch_ns_bwd(wbar, S, tr, Ps, powers, T, N)[1], M64))

    # Triton
    reason = triton_status(device)
    if reason is None:
        from intl_ops.kernels import _common
        from intl_ops.kernels.newton_schulz import newton_schulz_bwd, newton_schulz_fwd
        Ps_t = torch.empty_like(Ps)
        powers_t = torch.empty_like(powers)
        Ps_t[:, 0] = 1.5 * torch.eye(C, device=device) - 0.5 * S  # P_1 (the covariance kernel's output)

        def t_fwd():
            newton_schulz_fwd(S, Ps_t, powers_t)
            return Ps_t

        add("fwd", "triton", t_fwd, lambda: rel_err(t_fwd()[:, -1], Ps64[:, -1]))
        Gt = G.clone()  # newton_schulz_bwd overwrites its G: timed calls reuse the buffer (values do not matter)
        add("bwd", "triton", lambda: newton_schulz_bwd(Gt, S, Ps, powers),
            lambda: rel_err(newton_schulz_bwd(G.clone(), S, Ps, powers)[0], Sbar64))
        add("bwd", "triton+glue", lambda: triton_chain(Gt, S, tr, Ps, powers, N),
            lambda: rel_err(triton_chain(G.clone(), S, tr, Ps, powers, N), M64))
        if args.tf32:  # one tf32 MMA per product instead of the default tf32x3
            prec = _common.get_dot_precision()
            _common.set_dot_precision("tf32")
            try:
                add("fwd", "triton-tf32", t_fwd, lambda: rel_err(t_fwd()[:, -1], Ps64[:, -1]))
                add("bwd", "triton-tf32", lambda: newton_schulz_bwd(Gt, S, Ps, powers),
                    lambda: rel_err(newton_schulz_bwd(G.clone(), S, Ps, powers)[0], Sbar64))
            finally:
                _common.set_dot_precision(prec)
    else:
        rows += [{"C": C, "direction": d, "impl": "triton", "error": f"unavailable: {reason}"} for d in ("fwd", "bwd")]

    # CUDA
    reason = cuda_status(device)
    if reason is None:
        ops = torch.ops.intl_cuda
        add("fwd", "cuda", lambda: ops.ns_fwd(sigma, T), lambda: rel_err(ops.ns_fwd(sigma, T)[2][:, -1], Ps64[:, -1]))
        add("bwd", "cuda", lambda: ops.ns_bwd(wbar, S, tr, Ps, powers, T, N),
            lambda: rel_err(ops.ns_bwd(wbar, S, tr, Ps, powers, T, N), M64))
    else:
        rows += [{"C": C, "direction": d, "impl": "cuda", "error": f"unavailable: {reason}"} for d in ("fwd", "bwd")]
    return rows


def _dot_precision() -> str:
    try:
        from intl_ops.kernels import _common
        return _common.dot_precision()
    except Exception as exc:  # noqa: BLE001  (triton missing: reported, not fatal)
        return f"unknown ({type(exc).__name__})"


def ratio_lines(rows: list[dict]) -> list[str]:
    """One line per (C, pass): the medians, cuda / triton time and the speedup against the 1.5x goal
    (triton = the kernels at the default dot precision, as the backend runs them: tf32x3 products)."""
    t = {(r["C"], r["direction"], r["impl"]): r["median_us"] for r in rows if r.get("median_us") is not None}
    out = ["| C | pass | torch us | triton us | triton-tf32 us | triton+glue us | cuda us | cuda/triton time "
           "| speedup triton/cuda | goal >= 1.5x | speedup triton-tf32/cuda | speedup (triton+glue)/cuda |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    over = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
    for C in sorted({r["C"] for r in rows}):
        for d in ("fwd", "bwd"):
            tt, tc = t.get((C, d, "triton")), t.get((C, d, "cuda"))
            t32, tg = t.get((C, d, "triton-tf32")), t.get((C, d, "triton+glue"))
            goal = "-" if not (tt and tc) else ("MET" if tt / tc >= 1.5 else "not met")
            out.append(f"| {C} | {d} | {fmt(t.get((C, d, 'torch')))} | {fmt(tt)} | {fmt(t32)} | {fmt(tg)} | {fmt(tc)} "
                       f"| {f'{tc / tt:.2f}' if tt and tc else '-'} | {over(tt, tc)} | {goal} | {over(t32, tc)} "
                       f"| {over(tg, tc)} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,128,256", help="comma list of C")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--n", type=int, default=0, help="observations per view (default max(4C, 256))")
    ap.add_argument("--rep-ms", type=int, default=100, help="GPU: do_bench measuring time per variant")
    ap.add_argument("--reps", type=int, default=3, help="CPU: timed calls per variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the Triton kernels with tf32 products (default: on a GPU)")
    ap.add_argument("--out", default=None, help="write ns_compare.md / ns_compare.json here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.tf32 = device.type == "cuda" if args.tf32 is None else args.tf32
    if device.type == "cpu":
        torch.set_num_threads(1)
    time_it = timer(device, args.rep_ms, args.reps)
    rows = []
    print("| C | pass | impl | median us | p20 | p80 | rel err vs fp64 |\n|---|---|---|---|---|---|---|", flush=True)
    for C in (int(c) for c in args.sizes.split(",") if c.strip()):
        for r in compare(C, args, device, time_it):
            rows.append(r)
            if "median_us" in r:
                print(f"| {C} | {r['direction']} | {r['impl']} | {r['median_us']:.1f} | {r['p20_us']:.1f} "
                      f"| {r['p80_us']:.1f} | {r['err']:.2e} |", flush=True)
            else:
                print(f"| {C} | {r['direction']} | {r['impl']} | - | - | - | {r['error']} |", flush=True)
    ratios = ratio_lines(rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter: not timings)"
    meta = {**provenance(device), "device": device_name, "views": args.views, "iters": args.iters,
            "dot_precision": _dot_precision(),
            "timing": "do_bench median" if device.type == "cuda" else "perf_counter median (CPU)"}
    print(f"\nNewton-Schulz, CUDA vs Triton ({meta['device']}, {args.views} views, T={args.iters}; goal: speedup >= 1.5x)")
    print("\n".join(ratios), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ns_compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        (out / "ns_compare.md").write_text(f"# Newton-Schulz, CUDA vs Triton\n\n{meta}\n\n" + "\n".join(ratios) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
