"""The performance model (bench/model.py): that it records what the code really launches, costs every
Triton kernel, counts FLOPs like torch's own counter, and that the CLI prints model rows. Nothing here
asserts a speed. The model records the compiled (not interpreted) Triton kernels, so it runs in a
subprocess without the TRITON_INTERPRET=1 that tests/conftest.py sets: `probe()` below is that
subprocess's whole work, one JSON line back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Upper bounds on the launches (Triton launches + kernel-launching torch ops) of one call on the triton
# backend at T = 4, C = 64, set to the counts of the day they were added: lower them as kernels fuse.
LAUNCH_BOUNDS = {
    # 2 covariance + 3 Newton-Schulz + 2 apply; 2 split G + 6 Newton-Schulz + 1 dA + a zero grad_v (v unused)
    "iternorm forward axis=0": 7, "iternorm backward axis=0": 10,
    "iternorm forward axis=1": 7, "iternorm backward axis=1": 10,
    "trace_loss forward axis=0": 4, "trace_loss backward axis=0": 3,
    "trace_loss forward axis=1": 4, "trace_loss backward axis=1": 3,
    # + the views' stack and the loss head (2 / 1); 20 / 23 before the fused head
    "intl_loss forward axis=0": 10, "intl_loss backward axis=0": 11,
    "intl_loss forward axis=1": 10, "intl_loss backward axis=1": 11,
}
# Small shapes, both axes: (op, m, d, axis), K = 2 views for intl_loss. C = 64 (axis=0) and 48 (axis=1).
FLOP_CASES = (("iternorm", 64, 512, 0), ("iternorm", 96, 48, 1), ("intl_loss", 64, 512, 0), ("intl_loss", 96, 48, 1))
# The Triton kernels compute whole tiles and rows (C = 48 runs as 64: 1.25x) or triangles (about half of the
# C^3 products at large C, not at these shapes): their FLOPs may differ from bench/roofline's count this much.
FLOP_RATIO = (0.9, 1.5)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


# ------------------------------------------------------------------ the subprocess
def _profiled_op_counts(case) -> tuple[int, list[str]]:
    """Kernel-launching aten ops of bench's eager call (real CPU tensors) as torch.profiler sees them:
    aten events not inside a non-composite aten op (what a dispatch mode sees), minus composite ops
    (they decompose into the ops counted) and ops that launch nothing. Names as a list, for messages."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench import model
    from bench import providers as P

    def packet(name):
        return getattr(torch.ops.aten, name.split("::")[1])

    def composite(name):  # every overload decomposes (the profiler does not name the overload)
        flags = []
        for o in packet(name).overloads():
            try:
                flags.append(torch._C._dispatch_has_kernel_for_dispatch_key(
                    getattr(packet(name), o).name(), torch._C.DispatchKey.CompositeImplicitAutograd))
            except RuntimeError:  # TorchScript-only overloads (to.prim_Device)
                pass
        return all(flags)

    def visible(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::") and not composite(p.name):
                return False
            p = p.cpu_parent
        return True

    xs = P.make_inputs(case, torch.device("cpu"))
    fwd = P.get_forward(case, "eager")
    out = fwd(xs)
    dy = None if out.dim() == 0 else torch.randn_like(out)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fwd(xs).backward(dy)
    names = [e.name for e in prof.events() if e.name.startswith("aten::") and visible(e) and not composite(e.name)
             and model._launches_kernel(getattr(packet(e.name), packet(e.name).overloads()[0]))]
    return len(names), names


def probe() -> None:
    """Run in a subprocess without TRITON_INTERPRET: prints one JSON line with everything the tests check."""
    from unittest import mock

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import intl_ops
    from bench import model, roofline
    from bench import providers as P
    from bench.providers import Case
    from intl_ops.kernels import loss_head

    out = {"kernels": set(), "flop_ratios": {}, "eager_gemm_flops": {}, "op_counts": {}, "launch_counts": {}}
    costs = model.triton_costs()
    for op, m, d, axis in FLOP_CASES:
        for dtype in ("fp32", "bf16"):
            case = Case(op, m, d, axis=axis, k=2 if op == "intl_loss" else 1, dtype=dtype)
            for mode in ("forward", "backward"):
                pred = model.predict("triton", case, mode)
                out["kernels"] |= {launch.name for launch in pred.launches if launch.kind == "triton"}
                w = roofline.work(op, mode, m, d, axis, case.iters, case.k, dtype)
                out["flop_ratios"][f"{case.label()} {mode}"] = pred.flops / w.flops

    # eager: the plan's GEMM FLOPs against FlopCounterMode on real tensors, and its op count against the profiler
    for case in (Case("intl_loss", 24, 40, axis=1, k=2), Case("iternorm", 24, 40, axis=0, dtype="bf16")):
        xs = P.make_inputs(case, torch.device("cpu"))
        fwd = P.get_forward(case, "eager")
        for mode in ("forward", "backward"):
            plan = model.predict("eager", case, mode)
            gemm = sum(c.flops for c in plan.breakdown if c.kind == "torch" and c.precision != "-")
            if mode == "forward":
                with FlopCounterMode(display=False) as fc:
                    y = fwd(xs)
            else:
                with FlopCounterMode(display=False) as fc:
                    y.backward(None if y.dim() == 0 else torch.ones_like(y))
            out["eager_gemm_flops"][f"{case.label()} {mode}"] = [gemm, fc.get_total_flops()]
        full = model.predict("eager", case, "full")
        planned = [launch.name.split(".")[0] for launch in full.launches if launch.kind == "torch"]
        n, names = _profiled_op_counts(case)
        # autograd accumulates gradients in place on real tensors (add_), out of place on fake ones (add)
        out["op_counts"][case.label()] = {"plan": len(planned), "profiler": n,
                                          "plan_ops": sorted(name.rstrip("_") for name in planned),
                                          "profiler_ops": sorted(name.rstrip("_") for name in names)}

    # launches of the triton backend's public calls, T = 4, C = 64
    calls = {"iternorm": lambda axis: (lambda xs: intl_ops.iternorm(xs[0], 4, axis, backend="triton"), 1),
             "trace_loss": lambda axis: (lambda xs: intl_ops.trace_loss(xs[0], axis, backend="triton"), 1),
             "intl_loss": lambda axis: (lambda xs: intl_ops.intl_loss(xs, 4, axis, backend="triton"), 2)}
    for name, call in calls.items():
        for axis in (0, 1):
            fn, k = call(axis)
            shape = (64, 96) if axis == 0 else (96, 64)
            for mode, launches in zip(("forward", "backward"),
                                      model.record_forward_backward(fn, [shape] * k, torch.float32)):
                kernels = [e for e in launches if e.kind in ("triton", "torch")]
                out["launch_counts"][f"{name} {mode} axis={axis}"] = len(kernels)
                out["kernels"] |= {launch.name for launch in launches if launch.kind == "triton"}

    # the standalone nmse op (intl_loss uses the fused head): its kernels need costs too
    a, b = torch.randn(2, 64, 96), torch.randn(2, 64, 96)
    for call in (lambda: torch.ops.intl.nmse(a, b, "triton"), lambda: torch.ops.intl.nmse_bwd(torch.ones(2), a, b, "triton")):
        out["kernels"] |= {launch.name for launch in model.record(call) if launch.kind == "triton"}
    out["nmse_kernels"] = sorted(k for k in out["kernels"] if "nmse" in k)

    from intl_ops.kernels import newton_schulz
    out["ns_crossover"] = model.ns_crossover()[0]
    out["rows_max_c"] = newton_schulz.ROWS_MAX_C

    out["missing_costs"] = sorted(out.pop("kernels") - set(costs))
    # wrong-output meta-test: a kernel whose COSTS entry is missing must make the model fail, naming it
    with mock.patch.dict(loss_head.COSTS):
        del loss_head.COSTS["_head_cos_kernel"]
        try:
            model.predict("triton", Case("intl_loss", 64, 512, axis=0, k=2), "forward")
            out["missing_cost_error"] = None
        except KeyError as exc:
            out["missing_cost_error"] = str(exc)
    print(json.dumps(out))


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def probed() -> dict:
    proc = subprocess.run([sys.executable, "-c", "from tests.test_model import probe; probe()"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_triton_kernel_launched_has_a_cost(probed):
    assert probed["nmse_kernels"] == ["_nmse_bwd_kernel", "_nmse_fwd_kernel"]  # the recorder saw them
    assert probed["missing_costs"] == []


def test_a_missing_cost_is_an_error_naming_the_kernel_and_its_module(probed):
    msg = probed["missing_cost_error"]
    assert msg is not None, "the model costed a kernel that has no COSTS entry"
    assert "_head_cos_kernel" in msg and "intl_ops.kernels.loss_head" in msg


def test_triton_flops_match_the_roofline_count(probed):
    lo, hi = FLOP_RATIO
    assert len(probed["flop_ratios"]) == len(FLOP_CASES) * 2 * 2
    bad = {k: round(r, 3) for k, r in probed["flop_ratios"].items() if not lo <= r <= hi}
    assert not bad, f"triton plan FLOPs / bench/roofline FLOPs outside {FLOP_RATIO}: {bad}"


def test_eager_gemm_flops_equal_torch_flop_counter(probed):
    for label, (planned, counted) in probed["eager_gemm_flops"].items():
        assert counted > 0 and planned == counted, label


def test_eager_launches_equal_the_profiled_kernel_ops(probed):
    for label, c in probed["op_counts"].items():
        assert c["plan"] > 20, label  # the recorder saw the call at all
        assert c["plan"] == c["profiler"] and c["plan_ops"] == c["profiler_ops"], label


def test_newton_schulz_crossover_is_the_models(probed):
    """newton_schulz.ROWS_MAX_C is where the model predicts the row-block path stops being faster than the
    triangle tiles (bench.model.ns_crossover; measured timings on a GPU should move both together)."""
    assert probed["ns_crossover"] == probed["rows_max_c"]


def test_launch_counts_within_bounds(probed):
    counts = probed["launch_counts"]
    print("launches (Triton + torch) per call:", json.dumps(counts, indent=1))
    assert set(counts) == set(LAUNCH_BOUNDS)
    over = {k: (n, LAUNCH_BOUNDS[k]) for k, n in counts.items() if n > LAUNCH_BOUNDS[k]}
    assert not over, f"more launches than LAUNCH_BOUNDS allows (count, bound): {over}"


def test_cli_prints_model_rows_and_writes_them_labelled(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--model", "--no-files"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model" in proc.stdout and "| eager |" in proc.stdout and "| triton |" in proc.stdout
    assert "intl_loss 256x4096 ax1 T4 K=2 fp32" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "bench", "--model", "--out", str(tmp_path), "-v", "--ops", "iternorm",
                           "--dtypes", "fp32", "--modes", "full"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model breakdown" in proc.stdout and "_apply_fwd_kernel" in proc.stdout
    rows = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert rows and all(r["source"] == "model" and r["op"] == "iternorm" and r["mode"] == "full" for r in rows)
    assert {r["provider"] for r in rows} >= {"eager", "triton"}


def test_the_model_refuses_the_interpreter(monkeypatch):
    from bench import model

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        model.record(lambda: None)


def test_compare_puts_measured_rows_next_to_the_model(tmp_path):
    """--compare F.jsonl: the model for the cases of a GPU run's rows, with measured / model per row."""
    row = {"op": "iternorm", "m": 64, "d": 512, "axis": 0, "iters": 4, "k": 1, "dtype": "fp32", "mode": "full",
           "provider": "triton", "median_ms": 123.0, "graph_ms": 100.0, "device": "NVIDIA H200"}
    f = tmp_path / "run.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps({**row, "provider": "eager", "median_ms": 456.0}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "bench", "--model", "--no-files", "--compare", str(f), "--modes", "full"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.split("## model vs measured")[1]
    lines = [ln for ln in table.splitlines() if ln.startswith("| iternorm 64x512 ax0 T4 fp32 | full |")]
    assert {ln.split(" | ")[2] for ln in lines} >= {"triton", "eager"}
    triton = next(ln for ln in lines if " | triton | " in ln).split(" | ")
    assert triton[4] == "123" and float(triton[7].rstrip(" |")) == pytest.approx(123.0 / float(triton[3]), rel=0.01)
    f.write_text(json.dumps({**row, "device": "cpu"}) + "\n")  # CPU rows are not GPU measurements
    proc = subprocess.run([sys.executable, "-m", "bench", "--model", "--no-files", "--compare", str(f)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no measured GPU rows" in proc.stderr
