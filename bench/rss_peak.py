"""Cross-check of the CPU peak-memory column by another route: the process's resident-set high-water mark.

    MALLOC_MMAP_THRESHOLD_=65536 python -m bench.rss_peak reference iternorm 256 1024 1

Runs one full (fwd+bwd) call after a warm-up and prints VmHWM - VmRSS around it (Linux only:
/proc/self/clear_refs "5" resets VmHWM). The fixed mmap threshold makes glibc return every freed
block of >= 64 KiB to the OS, so freed memory is not reused unseen; run one provider per process.
"""
import re
import sys

import torch

from bench import providers as P
from bench.measure import mode_calls


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def main(argv=None) -> int:
    provider, op, m, d, axis = (argv or sys.argv[1:])[:5]
    torch.set_num_threads(1)
    case = P.Case(op, int(m), int(d), axis=int(axis), k=2 if op == "intl_loss" else 1)
    xs = P.make_inputs(case, torch.device("cpu"))
    call = mode_calls(P.get_forward(case, provider), xs, "full")
    call()
    for x in xs:
        x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    call()
    print(f"{provider} {case.label()} full: RSS high-water mark +{(_status('VmHWM') - base) / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
