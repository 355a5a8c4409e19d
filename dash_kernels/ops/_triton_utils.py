"""Triton import guard and the helpers the kernels share (int64 offsets, the linear-head logits tile, launch
sizes and configs).

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


@jit
def logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, hdim,
                stride_hn, stride_hh, stride_wv, stride_wh, inv_temp,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """z[BLOCK_M, BLOCK_V] = (hidden[rows] @ weight[cols]^T + bias[cols]) * inv_temp, fp32; 0 where masked.

    The linear head's logits tile, shared by the token_logprobs forward and its backward's dz kernel (which
    recomputes it rather than keep the [N, V] logits)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k in range(0, hdim, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        k_mask = ks < hdim
        h = tl.load(hidden_ptr + offsets_2d(rows, stride_hn, ks, stride_hh),
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BH]
        w = tl.load(weight_ptr + offsets_2d(cols, stride_wv, ks, stride_wh),
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # [BV, BH]
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BV]
        acc += b[None, :]
    return acc * inv_temp


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


def pick_config(table, dtype: torch.dtype) -> dict:
    """The launch config of a {"fp32": ..., "16bit": ...} tile table for operands of `dtype`."""
    return table["fp32" if dtype == torch.float32 else "16bit"]


def all_rows(rows, n: int, device) -> torch.Tensor:
    """The selected-row list [n_sel] int64 of a launcher: `rows` itself, or every row 0..n-1 when it is None."""
    return torch.arange(n, device=device, dtype=torch.int64) if rows is None else rows


# The ahead-of-time compile variants of the logits-tile kernels (token_logprobs forward and backward):
# (label, Triton pointer dtype, torch dtype, dot precision).
LOGITS_AOT_VARIANTS = (("fp32", "fp32", torch.float32, "ieee"), ("fp32-tf32", "fp32", torch.float32, "tf32"),
                       ("bf16", "bf16", torch.bfloat16, "tf32"))


def logits_tile_signature(dt: str) -> tuple[dict, dict]:
    """The AOT signature entries every kernel built on `logits_tile` shares, for pointer dtype `dt`: (the leading
    pointers, the trailing strides and inverse temperature); each kernel puts its own arguments between them."""
    pointers = {"hidden_ptr": f"*{dt}", "weight_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "targets_ptr": "*i64",
                "rows_ptr": "*i64"}
    strides = {"stride_hn": "i32", "stride_hh": "i32", "stride_wv": "i32", "stride_wh": "i32", "inv_temp": "fp32"}
    return pointers, strides
