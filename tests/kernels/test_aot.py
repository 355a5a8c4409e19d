"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), with no register spills and
shared memory within the sm_80 per-block limit (`python -m dash_kernels.aot` prints the full table); and the variants
compiled are the ones a real run launches (test_real_launches_are_the_compiled_variants)."""

import io
import json

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.slow
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
    assert {"token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_dh", "token_logprobs_bwd_dw",
            "policy_coef", "from_logits_fwd", "from_logits_bwd", "paged_attention", "paged_attention_combine",
            "sample_rows", "rms_norm", "rotary", "silu_mul", "store_kv", "copy_pages"} <= names


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


# Qwen2.5 shapes the presets launch (configs/qwen2.5-*-math.yaml: bf16, page size 256): 0.5B has 14 query / 2 KV
# heads of 64 (GQA group 7) and hidden 896; 1.5B has 12 / 2 heads of 128 (group 6) and hidden 1536.
QWEN25 = {"0.5B": {"hq": 14, "hkv": 2, "d": 64, "hidden": 896}, "1.5B": {"hq": 12, "hkv": 2, "d": 128, "hidden": 1536}}
PRESET_PAGE_SIZE = 256
_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _record(monkeypatch, module, name, launches):
    """Replaces module.<name> (a Triton kernel) by a stand-in that records each launch's kernel, first tensor dtype,
    keyword arguments (constexprs, num_warps, num_stages) and launches nothing."""
    kernel = getattr(module, name)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                first = next(a for a in args if isinstance(a, torch.Tensor))
                launches.append((name, kernel, _TAGS[first.dtype], kwargs))
            return launch

    monkeypatch.setattr(module, name, Recorder())


def _run_real_launchers(dtype):
    """Calls every launcher with the shapes of a real run (small token counts: the constexprs do not depend on them)."""
    from dash_kernels import copy_pages, paged_attention, rms_norm, rotary, sample_rows, silu_mul, store_kv
    from dash_kernels.ops import logprobs_from_logits, policy_loss, token_logprobs, token_logprobs_bwd

    for m in QWEN25.values():
        hq, hkv, d = m["hq"], m["hkv"], m["d"]
        cache = torch.zeros(3, PRESET_PAGE_SIZE, hkv, d, dtype=dtype)
        q = torch.zeros(2, hq, d, dtype=dtype)
        i32 = torch.zeros(2, dtype=torch.int32)
        table = torch.zeros(2, 4, dtype=torch.int32)  # 4 pages of 256: split decode (the interpreter's 8 "SMs")
        for max_q_len in (1, 3):  # decode (+ combine pass), then query runs behind a cached prefix
            paged_attention.paged_attention_fwd(q, cache, cache, table, i32 + 1, torch.arange(3, dtype=torch.int32),
                                                max_q_len, d ** -0.5)
        store_kv.store_kv_fwd(q[:, :hkv], q[:, :hkv], cache, cache, i32)
        copy_pages.copy_pages_fwd(cache, cache, i32, i32 + 1)
        x = torch.zeros(2, m["hidden"], dtype=dtype)
        rms_norm.rms_norm_fwd(x, x[0], 1e-6)
        rms_norm.rms_norm_fwd(x, x[0], 1e-6, delta=x)
        cos = torch.zeros(2, d)
        rotary.rotary_fwd(q, cos, cos)
        rotary.rotary_fwd(q[:, :hkv].contiguous(), cos, cos)
        silu_mul.silu_mul_fwd(x, x)
    V = 151936
    logits = torch.zeros(2, V, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)  # sampler logits are fp32
    for stops in (1, 2, 3):  # Qwen2.5-Instruct stops on <|im_end|> and <|endoftext|>
        sample_rows.sample_rows_fwd(logits, torch.ones(2), torch.zeros(2, dtype=torch.float64),
                               torch.zeros(2, stops, dtype=torch.long), torch.ones(2, dtype=torch.bool))
        for max_top_k in (50, 200):  # the presets' top_k = 50 (buffer 64); 200 bisects in the same variant
            sample_rows.sample_rows_fwd(logits, torch.ones(2), torch.zeros(2, dtype=torch.float64),
                                   torch.zeros(2, stops, dtype=torch.long), torch.ones(2, dtype=torch.bool),
                                   torch.full((2,), max_top_k), torch.ones(2), max_top_k=max_top_k)
    hidden, weight = torch.zeros(4, 896, dtype=dtype), torch.zeros(V, 896, dtype=dtype)
    targets, rows = torch.zeros(4, dtype=torch.long), torch.arange(4)
    norm, logp, ent = torch.zeros(4, 2), torch.zeros(4), torch.zeros(4)
    token_logprobs.token_logprobs_fwd(hidden, weight, None, targets, rows, 1.0, "triton")
    for ch in (None, ent):
        token_logprobs_bwd.token_logprobs_bwd(hidden, weight, None, targets, rows, norm, ent, logp, ch, 1.0,
                                              "triton", True, True, False)
    small = torch.zeros(4, 1000, dtype=dtype)
    logprobs_from_logits.logprobs_from_logits_fwd(small, targets, rows, 1.0, "triton")
    logprobs_from_logits.logprobs_from_logits_bwd(small, targets, rows, norm, ent, logp, ent, 1.0, "triton")
    policy_loss.policy_coef(logp, logp, logp, logp, logp, ent, (0.2, 0.28, 4.0, 0.04, 0.01, True), "triton")


KERNELS = {"paged_attention": ("_paged_attention_kernel", "_paged_attention_combine_kernel"),
           "store_kv": "_store_kv_kernel",
           "copy_pages": "_copy_pages_kernel", "rms_norm": "_rms_norm_kernel", "rotary": "_rotary_kernel",
           "silu_mul": "_silu_mul_kernel", "sample_rows": "_sample_rows_kernel",
           "ops.token_logprobs": "_token_logprobs_fwd_kernel",
           "ops.token_logprobs_bwd": ("_token_logprobs_bwd_kernel", "_token_logprobs_dh_kernel",
                                      "_token_logprobs_dw_kernel"),
           "ops.logprobs_from_logits": ("_logprobs_from_logits_fwd_kernel", "_logprobs_from_logits_bwd_kernel"),
           "ops.policy_loss": "_policy_coef_kernel"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_launches_are_the_compiled_variants(dtype, monkeypatch):
    """Every launch of a real run (Qwen2.5-0.5B / 1.5B shapes, page size 256, bf16 and fp32) is one of the variants
    `python -m dash_kernels.aot` compiles, with the same constexprs, num_warps and num_stages (the launchers and the
    specs read the same module constants, so they cannot drift). No launch happens: the kernels are replaced by
    recorders, so CPU tensors do here."""
    import importlib

    from dash_kernels import aot

    specs = aot.kernel_specs()
    launches = []
    for module_name, names in KERNELS.items():
        module = importlib.import_module(f"dash_kernels.{module_name}")
        for name in (names,) if isinstance(names, str) else names:
            _record(monkeypatch, module, name, launches)
    _run_real_launchers(dtype)
    every_kernel = {n for v in KERNELS.values() for n in ((v,) if isinstance(v, str) else v)}
    assert {name for name, *_ in launches} == every_kernel
    missing = []
    for name, kernel, tag, kwargs in launches:
        options = {k: kwargs.get(k) for k in ("num_warps", "num_stages")}
        constexprs = {k: v for k, v in kwargs.items() if k not in options}
        if not any(k is kernel and c == constexprs and o == options and f"*{tag}" in sig.values()
                   for _, k, sig, c, o in specs):
            missing.append((name, tag, constexprs, options))
    assert not missing, "launched but never AOT-compiled:\n" + "\n".join(map(str, missing))
