"""Fixtures of the `cuda` tests: every test here runs on a CUDA device, on the Triton backend, with TF32 off.

Without a CUDA device each test is skipped with the reason (tests/conftest.py), and the run's summary counts them.
Run them with `make gpu-check` on a GPU machine, or `.venv/bin/python -m pytest -m cuda tests/gpu -ra`.
"""

import pytest
import torch

from dash_kernels import backend


@pytest.fixture(autouse=True)
def gpu_defaults():
    """The Triton backend (what a CUDA run picks by default) and full-precision fp32 matmuls, so fp32 references
    are fp32 (torch's default; a test that flips TF32 on must not leak it into the next)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with backend.use_backend("triton"):
        yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def launches(monkeypatch):
    """`launches.spy(module, name)` records each launch of the Triton kernel module.<name> in the list `launches`,
    so a test can assert the kernel (not a torch fallback) ran."""

    class Launches(list):
        def spy(self, module, name):
            kernel = getattr(module, name)
            record = self.append

            class Spy:
                def __getitem__(self, grid):
                    record(name)
                    return kernel[grid]

            monkeypatch.setattr(module, name, Spy())

    return Launches()
