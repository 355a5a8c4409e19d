"""The sampler's projection GEMMs: torch (F.linear, MKL on the CPU wheel) vs dash_kernels.linear's packed AVX-512 GEMM.

    .venv/bin/python benchmarks/linear.py --threads 2 --out benchmarks/results/linear

Shapes are the decode steps of benchmarks/sampler.py's models (tiny: hidden 128, MLP 384, 4 / 2 heads of 32; wide:
hidden 512, MLP 1408, 8 / 2 heads of 64) at batch 8 and 256 (x [M, K] times W [N, K]^T), plus SwiGLU's gate/up pair
as the sampler runs it: torch's two GEMMs, silu and product vs one packed GEMM with the product in its epilogue.
The two variants are timed call by call, alternated (--calls each); the table keeps the 10th-percentile call, since
the box is shared and noise only ever adds time. Packing is not timed: the sampler packs once per generate call, not per GEMM.
Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dash_kernels.linear import (  # noqa: E402
    gate_up_silu_packed,
    linear_packed,
    pack_gate_up,
    pack_linear,
    packed_gemm_available,
)
from common import emit, result  # noqa: E402

# (model, projection, K, N) of one decoder layer; "gate_up" is the SwiGLU pair (N = the MLP width).
SHAPES = [("tiny", "q", 128, 128), ("tiny", "k/v", 128, 64), ("tiny", "o", 128, 128), ("tiny", "gate_up", 128, 384),
          ("tiny", "down", 384, 128), ("wide", "q", 512, 512), ("wide", "gate_up", 512, 1408),
          ("wide", "down", 1408, 512)]
PERCENTILE = 0.1


def time_pair(fn_a, fn_b, calls: int) -> tuple[float, float]:
    """Seconds of the PERCENTILE-th fastest of `calls` calls of each, alternated call by call so that load drifts
    hit both alike (after 10 warm-up calls each)."""
    for _ in range(10):
        fn_a(), fn_b()
    times: tuple[list, list] = ([], [])
    for _ in range(calls):
        for fn, acc in ((fn_a, times[0]), (fn_b, times[1])):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return tuple(sorted(t)[int(PERCENTILE * len(t))] for t in times)


def variants(M: int, K: int, N: int, proj: str):
    """(torch fn, packed fn, flops) for one shape."""
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g)
    if proj == "gate_up":
        wg, wu = torch.randn(N, K, generator=g), torch.randn(N, K, generator=g)
        packed = pack_gate_up(wg, wu)
        return (lambda: F.silu(F.linear(x, wg)).mul_(F.linear(x, wu)), lambda: gate_up_silu_packed(x, packed),
                2 * 2 * M * K * N)
    w, out = torch.randn(N, K, generator=g), torch.empty(M, N)
    packed = pack_linear(w)
    return lambda: torch.mm(x, w.t(), out=out), lambda: linear_packed(x, packed, out=out), 2 * M * K * N


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", default="", help="also write <out>.md (table) and <out>.json (the JSON line)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not packed_gemm_available(torch.zeros(1)):
        raise SystemExit("benchmarks/linear.py: the packed GEMMs need an AVX-512 CPU and the built _C")
    rows = []
    for model, proj, K, N in SHAPES:
        for M in (8, 256):
            torch_fn, packed_fn, flops = variants(M, K, N, proj)
            t_torch, t_packed = time_pair(torch_fn, packed_fn, args.calls)
            rows.append(dict(model=model, proj=proj, M=M, K=K, N=N, torch_us=round(t_torch * 1e6, 2),
                             packed_us=round(t_packed * 1e6, 2), torch_gflops=round(flops / t_torch / 1e9, 1),
                             packed_gflops=round(flops / t_packed / 1e9, 1), speedup=round(t_torch / t_packed, 2)))
    at256 = [r["speedup"] for r in rows if r["M"] == 256]
    record = result("linear", "cpu", threads=args.threads, min_speedup_256=min(at256), max_speedup_256=max(at256),
                    rows=rows)
    lines = [f"linear benchmark, {record['timestamp']}, cpu, {args.threads} thread(s), fp32, "
             f"{PERCENTILE:.0%}-percentile of {args.calls} calls\n",
             "| model | projection | M | K | N | torch us | packed us | torch GFLOP/s | packed GFLOP/s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['proj']} | {r['M']} | {r['K']} | {r['N']} | {r['torch_us']} | "
                     f"{r['packed_us']} | {r['torch_gflops']} | {r['packed_gflops']} | {r['speedup']}x |")
    emit("\n".join(lines), record, args.out)


if __name__ == "__main__":
    main()
