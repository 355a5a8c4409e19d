"""CPU paged decode attention: the C++ kernel (`dash_kernels._C.paged_decode_attention`) vs torch SDPA over gathered
pages (`dash_kernels.paged_attention.paged_attention_ref`, the generic CPU path), per call, at decode shapes.

    python benchmarks/paged_attention.py            # ~1 minute

One query per sequence, fp32, GQA (4 query / 2 KV heads), page size 16, contexts drawn uniformly from 20..48 tokens
(the tiny task's prompt + answer), pages scattered over a pool like a running engine's. Times are the minimum and the
median over repeated calls on the same inputs (hot cache); the first call is a warm-up. Both paths are checked to agree
(max abs difference) before timing. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dash_kernels._ext import require_c  # noqa: E402
from dash_kernels.paged_attention import paged_attention_ref  # noqa: E402

HQ, HKV, PAGE = 4, 2, 16
CTX_LO, CTX_HI = 20, 48
AGREE_ATOL = 1e-5  # fp32 softmax-weighted sums of O(1) values: both paths round differently at ~1e-7


def make_inputs(batch: int, head_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(CTX_LO, CTX_HI + 1, (batch,), generator=g, dtype=torch.int32)  # [B]
    width = -(-CTX_HI // PAGE)
    pool = batch * width + 1
    pages = torch.randperm(pool, generator=g)[: batch * width].view(batch, width).to(torch.int32)  # [B, W] scattered
    k = torch.randn(pool, PAGE, HKV, head_dim, generator=g)
    v = torch.randn(pool, PAGE, HKV, head_dim, generator=g)
    q = torch.randn(batch, HQ, head_dim, generator=g)  # [B, Hq, D]
    return q, k, v, pages, ctx


def time_calls(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,256,1024")
    parser.add_argument("--head-dims", default="32,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    C = require_c()
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for head_dim in [int(d) for d in args.head_dims.split(",")]:
            for batch in [int(b) for b in args.batches.split(",")]:
                q, k, v, pages, ctx = make_inputs(batch, head_dim)
                scale = head_dim**-0.5
                ours = lambda: C.paged_decode_attention(q, k, v, pages, ctx, scale)  # noqa: E731
                ref = lambda: paged_attention_ref(q, k, v, pages, ctx, None, scale)  # noqa: E731
                diff = float((ours() - ref()).abs().max())
                if diff > AGREE_ATOL:
                    raise SystemExit(f"C++ and reference disagree by {diff:.2e} at B={batch} D={head_dim}")
                c_min, c_med = time_calls(ours, args.repeats)
                r_min, r_med = time_calls(ref, args.repeats)
                rows.append({"threads": threads, "head_dim": head_dim, "batch": batch, "cpp_ms_min": c_min,
                             "cpp_ms_p50": c_med, "ref_ms_min": r_min, "ref_ms_p50": r_med,
                             "speedup_p50": r_med / c_med, "max_abs_diff": diff})
    print(f"{'threads':>7}{'D':>5}{'batch':>7}{'C++ min':>10}{'C++ p50':>10}{'SDPA min':>10}{'SDPA p50':>10}"
          f"{'speedup':>9}")
    for r in rows:
        print(f"{r['threads']:>7}{r['head_dim']:>5}{r['batch']:>7}{r['cpp_ms_min']:>10.3f}{r['cpp_ms_p50']:>10.3f}"
              f"{r['ref_ms_min']:>10.3f}{r['ref_ms_p50']:>10.3f}{r['speedup_p50']:>8.1f}x")
    print(json.dumps({"bench": "paged_attention", "device": "cpu", "rows": rows, "torch": torch.__version__,
                      "load_avg_1m": __import__("os").getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
