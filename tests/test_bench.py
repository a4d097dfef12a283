"""The benchmark harness's own logic (bench/): roofline counts, table and files, provider discovery
(from the backend registry), the CPU runner on tiny shapes, where a run's files go. Nothing here
asserts a speed."""
import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import intl_ops
from bench import measure, report, roofline, runner, timing
from bench import providers as P
from intl_ops import backends
from tests import toy_backend

CPU = torch.device("cpu")


# ------------------------------------------------------------------ roofline
def test_work_known_case_by_hand():
    # iternorm of x (m=3, d=5), axis=1: N=3 observations, C=5 variables, T=4.
    w = roofline.work("iternorm", "forward", 3, 5, 1, 4, 1, "fp32")
    assert w.flops == 4 * 3 * 25 + 6 * 3 * 125 + 6 * 15  # 2640
    assert w.bytes == 2 * 3 * 5 * 4  # x read + y written, fp32
    w = roofline.work("iternorm", "full", 3, 5, 1, 4, 1, "bf16")
    assert w.flops == (4 + 6) * 3 * 25 + (6 + 12) * 3 * 125 + 12 * 15
    assert w.bytes == 4 * 3 * 5 * 2  # x, dy read; y, dx written
    # axis=0 swaps the roles: C = m.
    assert roofline.work("iternorm", "forward", 5, 3, 0, 4, 1, "fp32") == roofline.work("iternorm", "forward", 3, 5, 1, 4, 1, "fp32")
    # intl_loss: K iternorms + (K-1) nmse pairs; losses write a scalar only.
    w = roofline.work("intl_loss", "backward", 3, 5, 1, 4, 6, "fp32")
    assert w.flops == 6 * (6 * 3 * 25 + 12 * 3 * 125 + 6 * 15) + 5 * 10 * 15  # 6 iternorm backwards, 5 nmse pairs
    assert w.bytes == 2 * 6 * 15 * 4
    assert roofline.work("trace_loss", "forward", 4, 8, 0, 4, 1, "fp32").bytes == 4 * 8 * 4
    with pytest.raises(ValueError, match="op"):
        roofline.work("nope", "full", 3, 5, 1, 4, 1, "fp32")


@pytest.mark.parametrize("axis, m, d, T", [(0, 6, 23, 4), (1, 19, 7, 5), (1, 9, 13, 1)])
def test_iternorm_forward_flops_count_the_minimum_algorithm(axis, m, d, T):
    """The forward formula counts docs/math.md §3 done the cheapest way: Sigma, the closed-form
    P_1, three products per later step, Y = Ac W (counted here by torch's FLOP counter)."""
    N, C = roofline.dims(m, d, axis)
    a = torch.randn(N, C, dtype=torch.float64)
    with FlopCounterMode(display=False) as fc:
        ac = a - a.mean(0)
        S = ac.T @ ac
        P = 1.5 * torch.eye(C, dtype=a.dtype) - 0.5 * S
        for _ in range(1, T):
            P2 = P @ P
            P = 1.5 * P - 0.5 * ((P2 @ P) @ S)
        ac @ P
    assert fc.get_total_flops() == roofline.iternorm_flops(N, C, T)[0] - 6 * N * C


def test_literal_products_vs_the_minimum_at_T4():
    """What the roofline's 27 C^3 products at T=4 (fwd 9 + bwd 18) compare with: the literal code
    does 12 forward (matrix_power + baddbmm per step, P_0 = I included) and 19 backward (autograd
    skips the gradients of P_0 = I, which a count of 36 would include): 31 in all."""
    N, C = 64, 8  # N != C so the C^3 and NC^2 terms can be told apart
    x = torch.randn(C, N, dtype=torch.float64, requires_grad=True)  # axis=0: C = m
    with FlopCounterMode(display=False) as fc:
        y = intl_ops.literal.iternorm(x, 4, 0)
    assert fc.get_total_flops() - 2 * 2 * N * C**2 == 12 * 2 * C**3  # Sigma and Y: one product each
    with FlopCounterMode(display=False) as fc:
        y.backward(torch.randn(C, N, dtype=torch.float64))
    assert fc.get_total_flops() - 4 * 2 * N * C**2 == 19 * 2 * C**3
    fwd, bwd = roofline.iternorm_flops(N, C, 4)
    assert fwd - 6 * N * C - 4 * N * C**2 == 9 * 2 * C**3
    assert bwd - 6 * N * C - 6 * N * C**2 == 18 * 2 * C**3


def test_floor_is_the_larger_bound():
    peaks = {"fp32": 1e12, "bf16": 4e12, "tf32": 2e12, "bytes_per_s": 1e11}
    w = roofline.Work(flops=2e12, bytes=1e9)
    assert roofline.floor_seconds(w, peaks, "fp32") == pytest.approx(2.0)       # compute bound
    assert roofline.floor_seconds(w, peaks, "fp32", tf32=True) == pytest.approx(1.0)
    assert roofline.floor_seconds(roofline.Work(1e9, 1e12), peaks, "bf16") == pytest.approx(10.0)  # memory bound
    assert roofline.floor_seconds(w, peaks, "bf16") == pytest.approx(0.5)
    slow_bf16 = {**peaks, "bf16": 0.5e12}  # a CPU without bf16 units: computing in fp32 is the floor
    assert roofline.floor_seconds(w, slow_bf16, "bf16") == pytest.approx(2.0)
    assert roofline.floor_seconds(w, {"fp32": 1e12}, "fp32") is None


def test_h200_table_matches_gpu_md():
    assert roofline.H200["bytes_per_s"] == 4.3e12 and roofline.H200["bf16"] == 790e12
    assert roofline.H200["tf32"] == roofline.H200["bf16"] / 2 and roofline.H200["fp32"] == 67e12


# ------------------------------------------------------------------ timing and memory
def test_summarize_quantiles():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (3.0, 1.8, 4.2, 5)


def test_cpu_peak_memory_sees_torch_allocations():
    keep = torch.randn(1000, 1000)  # allocated before: its free must not count

    def fn():
        nonlocal keep
        a = torch.empty(1_000_000)          # +4 MB
        b = torch.empty(2_000_000).fill_(1)  # +8 MB -> 12 MB live
        del a                               # 8 MB
        c = torch.empty(500_000)            # 10 MB
        keep = None
        return b, c

    peak = timing.peak_memory_cpu(fn)
    if peak is None:
        pytest.skip("this torch's profiler exposes no allocation events")
    assert peak == 12_000_000


# ------------------------------------------------------------------ providers
@pytest.fixture
def toy(monkeypatch):
    """tests/toy_backend.py registered as backend "toy" for one test (the registry restored after)."""
    monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))
    backends.register("toy", "tests.toy_backend")
    toy_backend.calls["iternorm_fwd"] = 0
    yield toy_backend.calls
    backends._load.cache_clear()


def test_provider_discovery_on_cpu():
    status = P.provider_status(CPU)
    assert P.providers_for("iternorm") == ("eager", "eager-amp", "compiled", *backends.registered())
    for name in ("eager", "eager-amp", "compiled", "reference"):
        assert status[name] is None
    available = intl_ops.available_backends(CPU)
    if available["cuda"] != "available":
        assert status["cuda"] == available["cuda"]  # the registry's reason, shown as is
    assert "interpreter" in status["triton"]  # interpreter timings are refused unless asked for
    assert P.provider_status(CPU, allow_interpreter=True)["triton"] == (
        None if available["triton"] == "available" else available["triton"])
    case = P.Case("iternorm", 6, 10)
    assert P.runnable(case, "reference", status, CPU) is None
    assert P.runnable(case, "triton", status, CPU) == status["triton"]
    assert "unknown provider" in P.runnable(case, "zca", status, CPU)
    assert P.runnable(P.Case("whiten", 6, 10), "zca", status, CPU) is None


def test_provider_discovery_follows_available_backends(monkeypatch):
    monkeypatch.setattr(intl_ops, "available_backends",
                        lambda device=None: {"reference": "available", "triton": "available", "cuda": "no toolkit"})
    status = P.provider_status(CPU, allow_interpreter=True)
    assert status["triton"] is None and status["cuda"] == "no toolkit" and status["reference"] is None


def test_a_registered_backend_is_benchmarked(toy, tmp_path, capsys):
    """Registering a backend is all it takes: bench/ lists it as a provider and times it where it
    runs the case itself (supports), and skips it, with the reason, where it does not."""
    assert "toy" not in P.FIXED_PROVIDERS and "toy" in P.providers_for("iternorm") and "toy" in P.all_providers()
    status = P.provider_status(CPU)
    assert status["toy"] is None
    assert P.runnable(P.Case("iternorm", 6, 10), "toy", status, CPU) is None
    assert "float16" in P.runnable(P.Case("iternorm", 6, 10, dtype="fp16"), "toy", status, CPU)
    assert "trace_loss_fwd" in P.runnable(P.Case("trace_loss", 6, 10), "toy", status, CPU)

    rc = runner.main(["--tiny", "--device", "cpu", "--ops", "iternorm,trace_loss", "--providers", "eager,toy",
                      "--modes", "forward", "--out", str(tmp_path), "--no-plot", "--min-reps", "2", "--no-memory"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = report.read_jsonl(next(tmp_path.glob("*_tiny.jsonl")))
    toy_rows = [r for r in rows if r["provider"] == "toy"]
    assert [(r["op"], r["status"]) for r in toy_rows] == [("iternorm", "ok"), ("iternorm", "ok")]  # 2 iternorm cases
    assert all(r["median_ms"] > 0 for r in toy_rows)
    # the toy's own forward ran, >= 6 times a row: mode_calls' forward, the first call, 2 warm-up calls, >= 2 timed
    assert toy["iternorm_fwd"] >= 2 * 6
    assert "toy skipped for trace_loss 12x40 ax0 T4 fp32: backend 'toy' does not provide trace_loss_fwd" in out


@pytest.mark.parametrize("case", [P.Case("iternorm", 7, 19, axis=0), P.Case("intl_loss", 17, 6, axis=1, k=3),
                                  P.Case("trace_loss", 5, 11, axis=1)], ids=lambda c: c.label())
def test_providers_compute_the_same_function(case):
    """The harness compares like with like: value and gradient of every CPU provider agree."""
    case = P.Case(**{**case.as_dict(), "dtype": "fp64"})
    status = P.provider_status(CPU, allow_interpreter=True)
    providers = [p for p in ("eager", *backends.registered()) if P.runnable(case, p, status, CPU) is None]
    assert {"eager", "reference"} <= set(providers)
    got = {}
    for provider in providers:
        xs = P.make_inputs(case, CPU)
        out = P.get_forward(case, provider)(xs)
        out.backward(torch.ones_like(out))
        assert all(x.grad is not None for x in xs), provider
        got[provider] = (out.detach(), [x.grad for x in xs])
    ref_out, ref_grads = got.pop("eager")
    for provider, (out, grads) in got.items():
        torch.testing.assert_close(out, ref_out, msg=provider)
        assert len(grads) == case.k
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, msg=provider)


def test_mode_calls():
    case = P.Case("iternorm", 6, 10)
    xs = P.make_inputs(case, CPU)
    fwd = P.get_forward(case, "reference")
    y = measure.mode_calls(fwd, xs, "forward")()
    torch.testing.assert_close(y, fwd(xs))
    assert xs[0].grad is None
    torch.manual_seed(1)  # the same random dy for the backward and the full call
    back = measure.mode_calls(fwd, xs, "backward")
    back()
    g1 = xs[0].grad.clone()
    assert g1.abs().sum() > 0
    back()  # retain_graph: the backward alone can be repeated
    torch.testing.assert_close(xs[0].grad, 2 * g1)
    xs[0].grad = None
    torch.manual_seed(1)
    measure.mode_calls(fwd, xs, "full")()  # forward and backward
    torch.testing.assert_close(xs[0].grad, g1)
    with pytest.raises(ValueError, match="mode"):
        measure.mode_calls(fwd, xs, "sideways")


# ------------------------------------------------------------------ table and files
ROW = {"date": "2026-01-01T00:00:00Z", "device": "Test CPU (2 cores)", "device_kind": "cpu", "torch": "x",
       "triton": "y", "cuda": "none", "python": "3", "git_sha": "abc", "threads": 1,
       "op": "intl_loss", "m": 8, "d": 16, "axis": 0, "iters": 4, "k": 2, "dtype": "fp32", "mode": "full",
       "provider": "reference", "status": "ok", "median_ms": 1.5, "p20_ms": 1.25, "p80_ms": 2.0, "reps": 9,
       "peak_mb": 0.5, "gflop": 1e-3, "min_mb": 0.01, "floor_ms": 0.5, "x_floor": 3.0, "speedup": 1.25}


def test_markdown_table_and_files(tmp_path):
    bad = {**ROW, "provider": "cuda", "status": "error: RuntimeError: a|b", "median_ms": None}
    for k in ("p20_ms", "p80_ms", "x_floor", "speedup"):
        bad.pop(k)
    table = report.markdown_table([ROW, bad]).splitlines()
    assert len(table) == 4
    ncols = table[0].count("|")
    assert all(line.count("|") == ncols for line in table)  # a '|' in a message does not break the table
    assert "intl_loss 8x16 ax0 T4 K=2 fp32" in table[2] and "1.25x" in table[2] and "3.00x" in table[2]
    assert "error: RuntimeError" in table[3]

    report.append_csv(tmp_path / "rows.csv", [ROW])
    report.append_csv(tmp_path / "rows.csv", [bad])
    with open(tmp_path / "rows.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2 and got[0]["git_sha"] == "abc" and got[0]["median_ms"] == "1.5" and got[1]["median_ms"] == ""
    assert set(report.PROVENANCE_KEYS) <= set(got[0])
    report.append_jsonl(tmp_path / "rows.jsonl", [ROW, bad])
    assert report.read_jsonl(tmp_path / "rows.jsonl") == [ROW, bad]


def test_provenance_and_file_names():
    prov = report.provenance(CPU)
    assert set(report.PROVENANCE_KEYS) <= set(prov)
    assert prov["torch"] == torch.__version__ and prov["device_kind"] == "cpu"
    assert report.slug("NVIDIA H200 (141 GB)") == "nvidia-h200"
    stem = report.run_stem({**prov, "date": "2026-01-02T03:04:05Z", "device": "NVIDIA H200"}, "full")
    assert stem == "2026-01-02-0304_nvidia-h200_full"


# ------------------------------------------------------------------ the runner, end to end on CPU
def test_cli_tiny_grid_writes_table_files_and_plot(tmp_path, capsys):
    rc = runner.main(["--tiny", "--device", "cpu", "--providers", "eager,eager-amp,reference,zca,cholesky,iternorm",
                      "--out", str(tmp_path), "--min-reps", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| case | mode | provider |" in out and "peaks (" in out
    (jsonl,) = tmp_path.glob("*_tiny.jsonl")
    rows = report.read_jsonl(jsonl)
    # 5 cases x (eager, eager-amp, reference) + 1 whiten case x (zca, cholesky, iternorm), x 3 modes
    assert len(rows) == (5 * 3 + 1 * 3) * 3
    assert {r["op"] for r in rows} == {"iternorm", "trace_loss", "intl_loss", "whiten"}
    bad = [r["status"] for r in rows if r["status"] != "ok"]
    assert not bad, bad
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gflop"] > 0 and r["min_mb"] > 0 and r["floor_ms"] > 0 and r["x_floor"] > 0
        assert r["peak_mb"] is not None and r["peak_mb"] >= 0
        assert r["git_sha"] and r["device"] and r["torch"] == torch.__version__
    assert {r["provider"] for r in rows if r["op"] == "iternorm"} == {"eager", "eager-amp", "reference"}
    assert {r["mode"] for r in rows} == set(P.MODES)
    # speedup: the median of the same case and mode's baseline (eager; zca for whiten) over the row's
    key = lambda r: (r["op"], r["m"], r["d"], r["axis"], r["iters"], r["k"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["provider"] == ("zca" if r["op"] == "whiten" else "eager")}
    assert len(base) == 6 * 3
    for r in rows:
        assert r["speedup"] == pytest.approx(base[key(r)] / r["median_ms"]), r
    assert {f.name for f in tmp_path.iterdir()} == {jsonl.name, jsonl.with_suffix(".md").name,
                                                    jsonl.with_suffix(".png").name}
    assert out.rstrip("\n").endswith(jsonl.with_suffix(".md").read_text().rstrip("\n"))
    # --table re-renders saved rows: the header, the separator and one line per row
    assert runner.main(["--table", str(jsonl), "--no-files"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| case |")
    assert all(float(line.split("|")[4]) > 0 for line in table[2:])  # every row shows its median


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_a_run_writes_only_into_its_ignored_out_folder(capsys):
    """The defaults, untouched: the run's files land in a new folder under bench/out/ (git-ignored)
    and nothing in bench/results/ (tracked) changes."""
    results_before = _snapshot(report.RESULTS)
    out_before = set(report.OUT.iterdir()) if report.OUT.exists() else set()
    rc = runner.main(["--tiny", "--device", "cpu", "--ops", "trace_loss", "--providers", "eager", "--modes", "forward",
                      "--min-reps", "2", "--no-memory"])
    assert rc == 0
    err = capsys.readouterr().err
    folder = Path(re.search(r"^files: (.+)/ \(", err, re.M).group(1))
    try:
        assert folder.parent == report.OUT and folder not in out_before
        assert sorted(p.suffix for p in folder.iterdir()) == [".jsonl", ".md", ".png"]
        assert _snapshot(report.RESULTS) == results_before
        git = subprocess.run(["git", "check-ignore", "-q", str(folder / "x.md")], cwd=report.ROOT)
        if git.returncode != 128:  # 128: not a git checkout
            assert git.returncode == 0, f"{folder} is not git-ignored"
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_save_copies_the_run_into_results(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    monkeypatch.setattr(report, "RESULTS", results)
    args = ["--tiny", "--device", "cpu", "--ops", "trace_loss", "--providers", "eager,reference", "--modes",
            "forward", "--min-reps", "2", "--no-memory", "--no-plot"]
    assert runner.main([*args, "--out", str(tmp_path / "run"), "--save"]) == 0
    err = capsys.readouterr().err
    run_files = sorted((tmp_path / "run").iterdir())
    assert [f.suffix for f in run_files] == [".jsonl", ".md"] and run_files[0].stem.endswith("_tiny")
    assert sorted(f.name for f in results.iterdir()) == sorted([f.name for f in run_files] + ["rows.csv", "rows.jsonl"])
    for f in run_files:
        assert (results / f.name).read_bytes() == f.read_bytes()
        assert str(results / f.name) in err
    rows = report.read_jsonl(run_files[0])
    assert [r["provider"] for r in rows] == ["eager", "reference"]
    assert report.read_jsonl(results / "rows.jsonl") == rows
    with open(results / "rows.csv") as f:
        assert [r["provider"] for r in csv.DictReader(f)] == ["eager", "reference"]
    # a second save of the same run is refused, and nothing is appended
    with pytest.raises(FileExistsError, match="not saved again"):
        report.save_run([run_files[0]], rows, results)
    assert len(report.read_jsonl(results / "rows.jsonl")) == 2
    # a run saved later (here: the rows re-rendered with --table) appends its rows
    monkeypatch.setattr(report, "OUT", tmp_path / "out")
    other = tmp_path / "other_tiny.jsonl"
    report.append_jsonl(other, rows[:1])
    assert runner.main(["--table", str(other), "--save", "--no-plot"]) == 0
    assert (results / "other_tiny.md").exists() and (tmp_path / "out" / "other_tiny" / "other_tiny.jsonl").exists()
    assert len(report.read_jsonl(results / "rows.jsonl")) == 3
    with pytest.raises(SystemExit):  # --save and --no-files contradict each other
        runner.parse_args(["--save", "--no-files"])


def test_run_dir_never_reuses_a_folder(tmp_path):
    a = report.run_dir("2026-01-02-0304_cpu_tiny", root=tmp_path)
    b = report.run_dir("2026-01-02-0304_cpu_tiny", root=tmp_path)
    assert a.name == "2026-01-02-0304_cpu_tiny" and b.name == "2026-01-02-0304_cpu_tiny-2"
    assert report.run_dir("x", out=tmp_path / "given") == tmp_path / "given" and (tmp_path / "given").is_dir()


def test_cli_compiled_and_profile(tmp_path, capsys):
    rc = runner.main(["--tiny", "--device", "cpu", "--ops", "iternorm", "--providers", "compiled,reference",
                      "--modes", "full", "--no-files", "--min-reps", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("| compiled |") == 2 and out.count("| reference |") == 2
    rc = runner.main(["--tiny", "--device", "cpu", "--ops", "trace_loss", "--providers", "eager,reference",
                      "--modes", "forward", "--profile", "--trace-dir", str(tmp_path)])
    assert rc == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "trace_loss" in line]
    assert len(lines) == 2
    for line in lines:
        launches = int(line.split("|")[4])
        assert launches > 0
    traces = list(tmp_path.glob("*.json"))
    assert len(traces) == 2 and json.loads(traces[0].read_text())["traceEvents"]
