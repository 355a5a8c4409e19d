"""Suite-wide settings. One torch thread per test process: the tests run tiny models where OpenMP's thread
hand-off costs more than it saves, and on a loaded 2-core machine two spinning threads per process slowed steps by up
to 10x (measured while developing). DASH_TEST_THREADS overrides it.

Tests marked `cuda` (tests/gpu/) run the GPU paths for real; without a CUDA device each is skipped with that reason,
and the terminal summary ends with one line counting them (`make gpu-check` runs them on a GPU)."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DASH_TEST_THREADS", "1")))

CUDA_SKIP_REASON = "no CUDA device (torch.cuda.is_available() is False)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """One line: how many `cuda` tests ran, and why the others did not."""
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        reports = [r for r in terminalreporter.stats.get(outcome, []) if "cuda" in getattr(r, "keywords", {})]
        if reports:
            counts[outcome] = len(reports)
    if counts:
        why = f": {CUDA_SKIP_REASON}" if not torch.cuda.is_available() and counts.get("skipped") else ""
        terminalreporter.write_line("cuda tests: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + why)
