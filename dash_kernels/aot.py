"""Ahead-of-time compile check: every Triton kernel of dash_kernels, for sm_80 (A100) and sm_90 (H100), no GPU needed.

    python -m dash_kernels.aot            # table per kernel variant and arch, then one JSON line

Each variant the launchers use (listed by the `aot_specs()` of each op module and of the sampler's decode ops: token
sampling, RMSNorm, RoPE, SiLU * up, paged attention, the KV store and page copy), with the `num_warps` / `num_stages`
the launcher passes (each module's NUM_WARPS / NUM_STAGES constants, read by both), goes through
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; the PTX is then assembled by the ptxas Triton
bundles for that arch with `-v`, whose report gives registers, spill stores/loads and shared memory.
The check (and the CI test) asks for zero spill bytes and shared memory within the sm_80 per-block limit. Exit
status 1 if a kernel fails to compile or breaks either rule.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from dash_kernels import copy_pages, paged_attention, rms_norm, rotary, sample_rows, silu_mul, store_kv
from dash_kernels.ops import logprobs_from_logits, policy_loss, token_logprobs, token_logprobs_bwd

# Keep Triton 3.9's current default (FP fusion on) explicitly, which also silences its warning about the default
# changing in 3.10; set the variable yourself to check the other setting.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ARCHS = (80, 90)
SM80_MAX_SHARED_BYTES = 166912  # 163 KiB: the most dynamic shared memory one block may use on an A100
_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def kernel_specs():
    """(name, kernel, signature, constexprs, options) for every Triton kernel variant we launch."""
    return (token_logprobs.aot_specs() + token_logprobs_bwd.aot_specs() + policy_loss.aot_specs()
            + logprobs_from_logits.aot_specs() + sample_rows.aot_specs() + rms_norm.aot_specs() + rotary.aot_specs()
            + silu_mul.aot_specs() + paged_attention.aot_specs() + store_kv.aot_specs() + copy_pages.aot_specs())


def _ptxas_path(arch):
    """The ptxas Triton itself uses for this arch (it bundles one for sm < 90 and a newer one for sm >= 90)."""
    from triton.backends.nvidia.compiler import get_ptxas  # optional dependency: Triton (extra `dev`), AOT only

    return get_ptxas(arch).path


def compile_one(kernel, signature, constexprs, options, arch):
    """Compiles one variant for sm_<arch>; returns the ptxas -v figures and the shared memory Triton allocates."""
    # optional dependency: Triton (not a runtime requirement of dash); only ahead-of-time compiling needs it
    import triton
    from triton.backends.compiler import GPUTarget  # optional dependency, as above
    from triton.compiler import ASTSource  # optional dependency, as above

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        arch_flag = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"  # Triton emits sm_90a PTX for Hopper
        proc = subprocess.run([_ptxas_path(arch), f"-arch={arch_flag}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-500:]}")
    report = {k: sum(int(x) for x in rx.findall(proc.stderr)) for k, rx in _PTXAS_RE.items()}
    report["shared_bytes"] = int(compiled.metadata.shared)
    return report


def run(out=sys.stdout):
    """Compiles everything, prints the table and the JSON line; returns (summary dict, rows)."""
    rows, errors = [], []
    start = time.perf_counter()
    for name, kernel, sig, const, options in kernel_specs():
        for arch in ARCHS:
            try:
                rows.append(dict(kernel=name, arch=f"sm_{arch}", **compile_one(kernel, sig, const, options, arch)))
            except Exception as exc:  # noqa: BLE001 (report every failure, then fail the run)
                errors.append(f"{name} sm_{arch}: {type(exc).__name__}: {exc}")
    header = f"{'kernel':44s} {'arch':6s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s} {'shared B':>9s}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        print(f"{r['kernel']:44s} {r['arch']:6s} {r['registers']:5d} {r['spill_stores']:9d} {r['spill_loads']:9d} "
              f"{r['shared_bytes']:9d}", file=out)
    for e in errors:
        print(f"FAILED {e}", file=out)
    spill = sum(r["spill_stores"] + r["spill_loads"] for r in rows)
    max_shared = max((r["shared_bytes"] for r in rows), default=0)
    summary = {
        "bench": "aot",
        "kernels": len(rows),
        "variants": len({r["kernel"] for r in rows}),
        "archs": [f"sm_{a}" for a in ARCHS],
        "spill_bytes": spill,
        "max_shared_bytes": max_shared,
        "sm80_shared_limit_bytes": SM80_MAX_SHARED_BYTES,
        "max_registers": max((r["registers"] for r in rows), default=0),
        "failed": len(errors),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary), file=out)
    return summary, rows


def main():
    summary, _ = run()
    ok = summary["failed"] == 0 and summary["spill_bytes"] == 0 and \
        summary["max_shared_bytes"] <= SM80_MAX_SHARED_BYTES
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
