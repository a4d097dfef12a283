"""`python -m bench`: see bench/runner.py and bench/README.md."""
import os

# Quiet the profiler's C++ loggers (kineto's start/stop lines) before torch is imported.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from bench.runner import main  # noqa: E402

raise SystemExit(main())
