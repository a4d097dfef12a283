"""`make cuda-check`, part 1: build the extension (cached) and vet ptxas' resource report of every kernel.

Builds csrc/ once with intl_ops.backend_cuda.build(), i.e. with intl_ops/cuda_build.py, the build
definition that `pip install` (setup.py) uses too: same sources and flags (the cache that
tests/test_cuda.py and the cuda backend then reuse: no second compile). Prints registers / static shared
memory / stack frame / spills per kernel, and exits 1 if any kernel spills or has a stack frame (every
kernel here is a hot one).
When ninja finds nothing to recompile, the report saved by the last compile of the .cu is shown.
Without a CUDA toolkit it says why and exits 0 (nothing to check).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from intl_ops import backend_cuda  # noqa: E402  (imports only; never compiles)

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    # drop the namespace noise: intl_cuda::(anonymous namespace)::ns_fwd_kernel<32>(...) -> ns_fwd_kernel<32>
    short = [re.sub(r"^.*::", "", n.replace("(anonymous namespace)::", "").split("(")[0]) for n in out]
    return short if len(out) == len(names) else names


def parse(log: str) -> list[dict]:
    kernels, cur = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            cur = {"name": m.group(1), "arch": m.group(2)}
            kernels.append(cur)
        elif cur is not None and (m := PROPS.search(line)):
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif cur is not None and (m := USED.search(line)):
            cur.update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    for k, name in zip(kernels, demangle([k["name"] for k in kernels])):
        k["name"] = name
    return kernels


def main() -> int:
    reason = backend_cuda.toolkit_reason()
    if reason is not None:
        print(f"cuda-check SKIPPED: {reason}")
        return 0
    saved = backend_cuda.build_dir() / "ptxas.log"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from intl_ops import backend_cuda as b; print(b.build(verbose=True))"],
                          cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(log[-8000:])
        print(f"cuda-check FAILED: the extension did not build ({took:.0f} s)")
        return 1
    if ENTRY.search(log):
        saved.write_text(log)
        print(f"built the extension in {took:.0f} s into {backend_cuda.build_dir()}")
    elif saved.exists():
        log = saved.read_text()
        print(f"extension up to date ({took:.0f} s); ptxas report of the last compile ({saved}):")
    else:
        print(f"cuda-check FAILED: no ptxas report (delete {backend_cuda.build_dir()} and rerun)")
        return 1

    kernels = parse(log)
    if not kernels:
        print("cuda-check FAILED: no kernels found in the ptxas report")
        return 1
    bad = []
    width = max(len(k["name"]) for k in kernels)
    print(f"{'kernel':<{width}} {'arch':<7} {'regs':>4} {'smem(static)':>12} {'stack':>5} {'spill st/ld':>11}")
    for k in kernels:
        spills = k.get("spill_st", -1) + k.get("spill_ld", -1)
        print(f"{k['name']:<{width}} {k['arch']:<7} {k.get('regs', -1):>4} {k.get('smem', 0):>12} "
              f"{k.get('stack', -1):>5} {k.get('spill_st', -1):>5}/{k.get('spill_ld', -1):<5}")
        if k.get("stack", -1) != 0 or spills != 0:
            bad.append(k["name"])
    print("(Newton-Schulz kernels <R rows, CL blocks>: dynamic shared memory 4 slabs of R x (CL R + 4) fp32 per block:"
          " 134 KB for <32, 8>, 67 KB for <16, 16>, 34 KB for <16, 8>)")
    if bad:
        print(f"cuda-check FAILED: stack frame or spills in {', '.join(bad)}")
        return 1
    print(f"cuda-check OK: {len(kernels)} kernels, no stack frame, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
