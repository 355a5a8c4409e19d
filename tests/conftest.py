"""Suite-wide settings. One torch thread per test process: the tests run tiny models where OpenMP's thread
hand-off costs more than it saves, and on a loaded 2-core machine two spinning threads per process slowed steps by up
to 10x (measured while developing). DASH_TEST_THREADS overrides it."""

import os

import torch

torch.set_num_threads(int(os.environ.get("DASH_TEST_THREADS", "1")))
