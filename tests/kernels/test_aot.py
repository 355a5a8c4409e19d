"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), with no register spills and
shared memory within the sm_80 per-block limit (`python -m dash_kernels.aot` prints the full table)."""

import io
import json

import pytest

pytest.importorskip("triton")


def test_aot_compile_no_spills_shared_within_sm80():
    from dash_kernels import aot

    buf = io.StringIO()
    summary, rows = aot.run(out=buf)
    report = buf.getvalue()
    assert json.loads(report.strip().splitlines()[-1]) == summary
    assert summary["failed"] == 0, report
    assert summary["archs"] == ["sm_80", "sm_90"]
    assert summary["kernels"] == 2 * summary["variants"] >= 2 * 10
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert summary["spill_bytes"] == 0 and not spilled, spilled
    assert summary["max_shared_bytes"] <= aot.SM80_MAX_SHARED_BYTES, report
    names = {r["kernel"].split("[")[0] for r in rows}
    assert {"token_logprobs_fwd", "token_logprobs_bwd", "policy_coef", "from_logits_fwd", "from_logits_bwd",
            "paged_attention", "sample_rows", "rms_norm", "rotary",
            "silu_mul"} <= names
