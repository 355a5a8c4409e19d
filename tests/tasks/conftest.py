"""Shared set-up for the tiny-task tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one torch thread, then restore the previous count.

    The tiny models here are overhead-bound, and on a shared 2-core machine 2 threads ran these tests up to 10x
    slower than 1 (each thread spins waiting for the other's descheduled core). The assertions hold either way:
    the checkpoint band allows for the float differences another thread count brings.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
