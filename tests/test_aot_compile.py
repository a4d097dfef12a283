"""bench/aot_compile.py (the sm_90 ahead-of-time compile of the Triton launches), in CI's triton.

Each run is a subprocess: the tool needs the kernels defined without TRITON_INTERPRET, which this
test session sets (conftest). The full compile runs in `make test-device`; here only the enumeration
and a two-configuration compile (about 20 s in all).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "bench" / "aot_compile.py"

pytest.importorskip("triton")


def _load_tool():
    spec = importlib.util.spec_from_file_location("aot_compile", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("aot_compile", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)  # stdlib imports only at module level
    return mod


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "INTL_OPS_DOT_PRECISION")}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(TOOL), *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 420 bytes cmem[0]"""
    assert _load_tool().parse_ptxas(log) == dict(stack=8, spill_stores=4, spill_loads=8, regs=96)


def test_enumeration_covers_every_function_and_kernel(tmp_path):
    proc, report = _run(tmp_path, "--list")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert all(n > 0 for n in report["counts"].values()), report["counts"]
    # a kernel that no scenario launches is never compiled: add a shape or mode that reaches it
    assert report["unlaunched"] == [], report["unlaunched"]
    kernels = {c["kernel"] for c in report["configs"]}
    assert len(kernels) >= 10 and len(report["configs"]) > len(kernels)
    for c in report["configs"]:
        assert c["num_warps"] in (1, 2, 4, 8, 16) and c["constexprs"]


def test_compile_a_subset_for_sm90(tmp_path):
    proc, report = _run(tmp_path, "--functions", "trace_loss_fwd", "--dtypes", "float32", "--modes", "auto",
                        "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "aot-compile OK" in proc.stdout
    assert report["counts"] == {"trace_loss_fwd": report["counts"]["trace_loss_fwd"]} and report["configs"]
    for c in report["configs"]:
        assert c["regs"] > 0 and c["spill_stores"] == 0 and c["shared"] >= 0, c
