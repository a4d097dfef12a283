"""pytest-benchmark entries live in bench/ (`pytest bench/ --benchmark-only`); plain `pytest` only
collects tests/ (pyproject's testpaths), so these never run in CI."""
import torch


def pytest_configure(config):
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as `python -m bench` on CPU: stable timings on a shared machine
