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


def test_every_kernel_compiles_with_its_integer_arguments_equal_to_one():
    """Triton's JIT turns an integer argument equal to 1 into a compile-time constant (a plain Python int inside the
    kernel), so a launch with one row, one split or a unit stride compiles a different kernel than the AOT variants
    above; the interpreter never does this. One variant per kernel, every i32 / i64 argument a constexpr 1."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dash_kernels import aot

    failed, seen = {}, set()
    for name, kernel, signature, constexprs, options in aot.kernel_specs():
        base = name.split("[")[0]
        if base in seen:
            continue
        seen.add(base)
        ones = {arg: 1 for arg, kind in signature.items() if kind in ("i32", "i64")}
        sig = {**signature, **{arg: "constexpr" for arg in ones}}
        try:
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs={**constexprs, **ones}),
                           target=GPUTarget("cuda", 80, 32), options=options)
        except Exception as exc:  # noqa: BLE001 - any compile error is the finding; report them all at once
            failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    assert len(seen) >= 10
    assert not failed, failed
