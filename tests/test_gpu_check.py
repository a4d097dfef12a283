"""bench/gpu_check.sh, the one script for a lent GPU: its dry run (the same script, every GPU step
turned into its CPU / interpreter twin) and its fast aborts. The device tool brings back only a few
files from $OUT, with names of [A-Za-z0-9._-], so $OUT must hold exactly the archive and the summary."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from intl_ops import backends

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["00_env", "01_build", "02_test_triton", "03_test_cuda", "04_bench_headline", "05_ns_compare",
         "06_train_step", "07_profile", "08_sanitize"]
SAFE = re.compile(r"^[A-Za-z0-9._/-]+$")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OUT", "GPU_CHECK_BUDGET", "INTL_OPS_JIT", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS")}
    env.update({"PYTHON": sys.executable, **extra})
    return env


def _run(args, out: Path, timeout: float, **env):
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(OUT=str(out), **env),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run for the whole module: (process, seconds, OUT, archive member names, summary text)."""
    out = tmp_path_factory.mktemp("gpu_check_out")
    proc, took = _run(["--dry-run"], out, timeout=600)
    names = []
    if (out / "gpu_check.tar.gz").exists():
        with tarfile.open(out / "gpu_check.tar.gz") as tar:
            names = tar.getnames()
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    return proc, took, out, names, summary


def _rows(summary: str) -> dict:
    """step -> (rc, result) from the summary's step table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in STEPS:
            rows[cells[0]] = (cells[2], cells[3])
    return rows


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_exits_0_with_exactly_two_files(dry):
    proc, took, out, _, _ = dry
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.md"]
    assert took < 300, f"the dry run took {took:.0f} s"


def test_archive_names_are_safe(dry):
    _, _, _, names, _ = dry
    assert names, "empty or missing archive"
    bad = [n for n in names if not SAFE.match(n) or ".." in n.split("/") or n.startswith("/")]
    assert not bad, bad


def test_archive_holds_every_log_junit_and_bench_rows(dry):
    _, _, out, names, _ = dry
    members = set(names)
    for step in STEPS[:-1]:  # 08_sanitize is skipped in the dry run (it needs a GPU)
        assert f"gpu_check/logs/{step}.log" in members, step
    for f in ("summary.md", "gpu_check.log", "junit/02_test_triton.xml", "junit/03_test_cuda.xml",
              "results/ns_compare/ns_compare.md", "results/ns_compare/ns_compare.json", "results/train_step_cpu.json"):
        assert f"gpu_check/{f}" in members, f
    bench = sorted(n for n in names if n.startswith("gpu_check/results/bench_headline/"))
    assert [n.rsplit(".", 1)[1] for n in bench] == ["jsonl", "md", "png"], bench  # <date>_<device>_tiny.*
    assert all(re.fullmatch(r"gpu_check/results/bench_headline/.+_tiny\.\w+", n) for n in bench), bench
    assert any(n.startswith("gpu_check/results/traces/") and n.endswith(".json") for n in names)
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        for step in ("02_test_triton", "03_test_cuda"):
            root = ET.fromstring(tar.extractfile(f"gpu_check/junit/{step}.xml").read())
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            assert int(suite.get("tests")) > 0, step
        rows = [json.loads(r) for r in tar.extractfile(bench[0]).read().decode().splitlines()]
        # the providers: eager and every registered backend (those that cannot run here are notes, not rows)
        log = tar.extractfile("gpu_check/logs/04_bench_headline.log").read().decode()
    assert f"--providers eager,{','.join(backends.registered())} " in log.splitlines()[0]
    if not torch.cuda.is_available():  # on CPU only eager and reference run (Triton: not under the interpreter)
        assert {r["provider"] for r in rows} == {"eager", "reference"}
        for name in set(backends.registered()) - {"reference"}:
            assert f"- {name} skipped: " in log, name


def test_summary_names_every_step_with_its_rc(dry):
    _, _, _, _, summary = dry
    rows = _rows(summary)
    assert list(rows) == STEPS, summary
    assert "status: finished" in summary
    for step in ("00_env", "04_bench_headline", "05_ns_compare", "06_train_step", "07_profile"):
        assert rows[step] == ("0", "ok"), (step, rows[step])
    assert rows["01_build"][0] in ("0", "124"), rows["01_build"]  # 124: no build cache here, cut at its limit
    for step in ("02_test_triton", "03_test_cuda"):
        assert rows[step][0].isdigit(), rows[step]
    assert rows["08_sanitize"][1].startswith("SKIPPED"), rows["08_sanitize"]
    assert re.search(r"\| sum \| \d+ <= budget \d+ \|", summary)
    assert re.search(r"passed", summary)  # the pytest count lines


def test_stale_build_lock_removed_after_a_failed_build(tmp_path):
    """A killed build leaves <build dir>/<tag>/lock (torch 2.11: every later build() waits forever).
    Dry run, build failing at once (an invalid arch): an old lock goes, a young one (maybe another
    user's build in progress on a shared machine) stays. Only 00_env and 01_build run."""
    cache = tmp_path / "cache"
    (cache / "cuda_old").mkdir(parents=True)
    (cache / "cuda_young").mkdir()
    old, young = cache / "cuda_old" / "lock", cache / "cuda_young" / "lock"
    old.touch()
    young.touch()
    os.utime(old, (time.time() - 1200, time.time() - 1200))
    out = tmp_path / "out"
    proc, _ = _run(["--dry-run"], out, timeout=120, GPU_CHECK_ONLY="01_build", INTL_OPS_CUDA_ARCH="80",
                   INTL_OPS_CUDA_BUILD_DIR=str(cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows((out / "summary.md").read_text())
    assert rows["01_build"][0] == "1", rows
    assert all(rows[s][1].startswith("SKIPPED: not selected") for s in STEPS[2:]), rows
    assert not old.exists() and young.exists()
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        log = tar.extractfile("gpu_check/gpu_check.log").read().decode()
    assert f"removed build lock {old}" in log and str(young) not in log


@pytest.mark.parametrize("python", ["/bin/false", "no-torch"])
def test_aborts_fast_without_torch(tmp_path, python):
    if python == "no-torch":  # this interpreter without site-packages: no torch
        wrapper = tmp_path / "python_without_site"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
        wrapper.chmod(0o755)
        python = str(wrapper)
    out = tmp_path / "out"
    proc, took = _run([], out, timeout=60, PYTHON=python)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert took < 20
    assert "ABORT" in proc.stdout and "cannot import torch" in proc.stdout
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.md"]
    assert "ABORTED" in (out / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the abort on a machine without a GPU")
def test_aborts_fast_without_gpu(tmp_path):
    out = tmp_path / "out"
    proc, took = _run([], out, timeout=60, GPU_CHECK_BUDGET="60")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert took < 20, took
    assert "ABORT: no GPU visible to torch" in proc.stdout
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.md"]


def test_unknown_argument_is_refused(tmp_path):
    proc, _ = _run(["--dryrun"], tmp_path / "out", timeout=30)
    assert proc.returncode == 64 and "unknown argument" in proc.stderr


def test_ns_compare_ratio_table():
    spec = importlib.util.spec_from_file_location("ns_compare", ROOT / "bench" / "ns_compare.py")
    ns = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ns)
    rows = [{"C": 64, "direction": "fwd", "impl": "triton", "median_us": 30.0},
            {"C": 64, "direction": "fwd", "impl": "cuda", "median_us": 10.0},
            {"C": 64, "direction": "bwd", "impl": "triton", "median_us": 20.0},
            {"C": 64, "direction": "bwd", "impl": "cuda", "median_us": 16.0},
            {"C": 64, "direction": "bwd", "impl": "cuda", "error": "x"}]
    lines = ns.ratio_lines(rows)
    fwd = next(line for line in lines if "| 64 | fwd |" in line)
    bwd = next(line for line in lines if "| 64 | bwd |" in line)
    assert "| 0.33 | 3.00x | MET |" in fwd
    assert "| 1.25x | not met |" in bwd
