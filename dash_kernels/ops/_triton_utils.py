"""Triton import guard and the helpers every kernel shares (int64 offsets, launch sizes).

Triton is optional: without it the kernel definitions below still import (as plain functions that are never called)
and the torch backend runs.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
    triton = None

    class tl:
        constexpr = None

    def jit(fn):
        return fn


@jit
def offsets_2d(rows, row_stride, cols, col_stride):
    """Element offsets rows[:, None] * row_stride + cols[None, :] * col_stride, computed in int64.

    N * V (and N * H for long packed batches) passes 2**31, so int32 offsets would wrap silently.
    """
    return rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :] * col_stride


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: "ieee" unless torch itself allows TF32 matmuls (then "tf32"); ignored for 16-bit inputs."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def num_programs_target(device: torch.device) -> int:
    """About four programs per SM keeps a GPU busy; a fixed guess off-GPU (interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


DETERMINISTIC_ENV = "DASH_KERNELS_DETERMINISTIC"


def deterministic_mode() -> bool:
    """Whether the Triton backwards must give bitwise-identical gradients run to run: DASH_KERNELS_DETERMINISTIC=1
    (read at each call), or `torch.use_deterministic_algorithms(True)`. Off by default: the fused-loss backward then
    adds its dW split-K partials with relaxed atomics, exact up to the order of those fp32 adds."""
    env = os.environ.get(DETERMINISTIC_ENV, "").strip().lower()
    if env and env not in ("0", "1", "true", "false"):
        raise ValueError(f"{DETERMINISTIC_ENV} must be 0 or 1, got {env!r}")
    return env in ("1", "true") or torch.are_deterministic_algorithms_enabled()
