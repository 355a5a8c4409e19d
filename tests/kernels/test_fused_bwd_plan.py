"""The fused-loss Triton backward's plan (vocab chunks, dW splits, extra memory) and its deterministic switch.

Plain arithmetic and environment handling, so it runs everywhere; the kernels themselves are checked under the
Triton interpreter (interp_fused_bwd_cases.py) and compiled ahead of time (test_aot.py).
"""

import pytest
import torch

from dash_kernels.ops import token_logprobs_bwd as tlp_bwd
from dash_kernels.ops._triton_utils import DETERMINISTIC_ENV, deterministic_mode

# The shape: a DASH micro-batch of Qwen2.5-0.5B in bf16, on an H100 (132 SMs, 4 programs per SM).
N, H, V = 16384, 896, 151936
H100_PROGRAMS = 4 * 132
MEM_FRAC_TARGET = 0.05  # extra memory <= 5% of the naive path's bf16 [N, V] logits alone


@pytest.mark.parametrize("deterministic", [True, False])
def test_extra_memory_at_the_real_shape_is_under_5_percent_of_the_naive_logits(deterministic):
    plan = tlp_bwd.backward_plan(N, V, H, torch.bfloat16, H100_PROGRAMS, deterministic)
    naive_logits = N * V * 2
    assert plan.extra_bytes <= MEM_FRAC_TARGET * naive_logits, (plan, plan.extra_bytes / naive_logits)
    assert plan.chunk_v % tlp_bwd.DZ_CHUNK_ALIGN == 0 and plan.n_chunks * plan.chunk_v >= V
    assert N * plan.chunk_v * 2 <= tlp_bwd.DZ_CHUNK_BYTES
    assert 1 < plan.dw_splits <= tlp_bwd.MAX_DW_SPLITS  # 448 (vocab x H) tiles per chunk: 2 splits fill 528 programs
    # The formula, term by term (docstring of backward_plan): dz chunk, dH running sum, dW partial planes.
    planes = plan.dw_splits if deterministic else 1
    assert plan.extra_bytes == N * plan.chunk_v * 2 + N * H * 4 + planes * plan.chunk_v * H * 4


def test_small_batches_take_one_chunk_and_no_running_sum():
    """Few rows: the whole vocabulary is one chunk, dH is written once (no fp32 [n, H] buffer), and the dW tiles
    alone fill the GPU (one split: each program writes its dW tile once, in the weight's dtype)."""
    plan = tlp_bwd.backward_plan(64, V, H, torch.bfloat16, H100_PROGRAMS, True)
    assert plan.n_chunks == 1 and plan.chunk_v == V and plan.dw_splits == 1
    assert plan.extra_bytes == 64 * V * 2


def test_splits_cover_every_row_once():
    for n in (1, 63, 64, 65, 1000, 4097):
        plan = tlp_bwd.backward_plan(n, 1000, 64, torch.float32, 10_000, True)
        assert (plan.dw_splits - 1) * plan.rows_per_split < n <= plan.dw_splits * plan.rows_per_split, (n, plan)


def test_deterministic_mode_switches(monkeypatch):
    monkeypatch.delenv(DETERMINISTIC_ENV, raising=False)
    assert deterministic_mode() is torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv(DETERMINISTIC_ENV, "1")
    assert deterministic_mode()
    monkeypatch.setenv(DETERMINISTIC_ENV, "0")
    assert not deterministic_mode()
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert deterministic_mode()  # torch's global switch turns it on too
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setenv(DETERMINISTIC_ENV, "yes please")
    with pytest.raises(ValueError, match=DETERMINISTIC_ENV):
        deterministic_mode()
