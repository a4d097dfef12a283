"""pytest plugin of bench/gpu_check.sh (loaded with `-p bench.pytest_gpu_check`), driven by env:

GPU_CHECK_TEST_BUDGET=S   tests that would start after S seconds are skipped ("time budget"), so the
                          step ends by itself, with its junit XML and the short summary, before the
                          script's hard limit (SIGINT) has to stop it.
GPU_CHECK_ONE_PER_TEST=1  (the dry run) keep only the first parametrization of each test function:
                          every test of the file is exercised once, in seconds, under the interpreter.
"""
from __future__ import annotations

import os
import time

import pytest

_START = time.monotonic()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GPU_CHECK_ONE_PER_TEST", "0") != "1":
        return
    seen, keep, drop = set(), [], []
    for item in items:
        key = (item.nodeid.split("::")[0], getattr(item, "originalname", None) or item.name)
        (drop if key in seen else keep).append(item)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    budget = float(os.environ.get("GPU_CHECK_TEST_BUDGET", "0") or 0)
    if budget > 0 and time.monotonic() - _START > budget:
        pytest.skip(f"gpu_check: test time budget of {budget:.0f} s reached")
