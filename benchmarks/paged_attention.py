"""CPU paged attention: the C++ kernel (`torch.ops.dash.paged_attention`) vs torch SDPA, per call, at the sampler's
shapes: decode, and prefill with and without a cached prefix.

    python benchmarks/paged_attention.py --out benchmarks/results/paged_attention   # ~2 minutes

fp32, GQA (4 query / 2 KV heads), page size 16, pages scattered over a pool like a running engine's. Modes:
- decode: one query per sequence, contexts uniform in 20..48 tokens (the tiny task's prompt + answer). Reference:
  SDPA over the gathered pages (`paged_attention_ref`, the generic CPU path).
- prefill: a fresh ragged prompt per sequence, 8..24 tokens, all of them queries (the C++ kernel reads the K/V the
  step just stored). Reference: `dash.attention.varlen_attention` over the dense K/V, the engine's prefill before
  the C++ kernel took query runs (pads the runs to the longest).
- prefix: 16 new queries after a 48-token cached prefix (a shared system prompt). Reference: `paged_attention_ref`.
- long / long-equal: fresh prefill of 128..256-token / exactly 256-token prompts, batch / 16 sequences, against
  varlen SDPA: where one query per task loses to SDPA's blocked kernel (runs of equal, long length), which is why
  the engine picks per step (`dash_kernels.paged_attention.cpu_prefill_prefers_pages`).
Times are the minimum and the median over repeated calls on the same inputs (hot cache); the first call is a
warm-up. Both paths are checked to agree (max abs difference) before timing. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from dash.attention import varlen_attention  # noqa: E402
from dash_kernels._ext import require_c  # noqa: E402
from dash_kernels.paged_attention import paged_attention_ref  # noqa: E402
from common import emit, result  # noqa: E402

HQ, HKV, PAGE = 4, 2, 16
# mode -> (query tokens per sequence: None = the whole context, context length range, batch divisor). The long modes
# run batch / 16 sequences, so a row's token count stays near the short modes'.
MODES = {"decode": (1, (20, 48), 1), "prefill": (None, (8, 24), 1), "prefix": (16, (64, 64), 1),
         "long": (None, (128, 256), 16), "long-equal": (None, (256, 256), 16)}
FRESH_PREFILL = ("prefill", "long", "long-equal")  # measured against varlen SDPA over the fresh K/V
AGREE_ATOL = 1e-5  # fp32 softmax-weighted sums of O(1) values: both paths round differently at ~1e-7


def make_inputs(mode: str, batch: int, head_dim: int, seed: int = 0):
    """q [T, Hq, D], caches [pool, PAGE, Hkv, D], page table [B, W], context lens [B], cu_seqlens_q [B+1] or None."""
    q_len, (lo, hi), divisor = MODES[mode]
    batch = max(1, batch // divisor)
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(lo, hi + 1, (batch,), generator=g, dtype=torch.int32)  # [B]
    q_lens = ctx if q_len is None else torch.full_like(ctx, q_len)  # [B]
    width = -(-hi // PAGE)
    pool = batch * width + 1
    pages = torch.randperm(pool, generator=g)[: batch * width].view(batch, width).to(torch.int32)  # [B, W] scattered
    k = torch.randn(pool, PAGE, HKV, head_dim, generator=g)
    v = torch.randn(pool, PAGE, HKV, head_dim, generator=g)
    q = torch.randn(int(q_lens.sum()), HQ, head_dim, generator=g)  # [T, Hq, D]
    cu = None if q_len == 1 else torch.cat([torch.zeros(1, dtype=torch.int32), q_lens.cumsum(0).to(torch.int32)])
    return q, k, v, pages, ctx, cu


def dense_kv(k, v, pages, ctx):
    """The K/V of a fresh prefill as the varlen path sees them: [T, Hkv, D] packed by sequence (gathered untimed)."""
    slots = torch.cat([pages[b, torch.arange(n) // PAGE].long() * PAGE + torch.arange(n) % PAGE
                       for b, n in enumerate(ctx.tolist())])
    return k.flatten(0, 1)[slots], v.flatten(0, 1)[slots]


def reference(mode, q, k, v, pages, ctx, cu, scale):
    """The SDPA path the C++ kernel is measured against (see the module docstring)."""
    if mode in FRESH_PREFILL:
        k_dense, v_dense = dense_kv(k, v, pages, ctx)
        max_len = int(ctx.max())
        return lambda: varlen_attention(q, k_dense, v_dense, cu, max_len, scale)
    return lambda: paged_attention_ref(q, k, v, pages, ctx, cu, scale)


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
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batches", default="8,256,1024")
    parser.add_argument("--head-dims", default="32,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="", help="also write <out>.md (table) and <out>.json (the JSON line)")
    args = parser.parse_args()
    require_c()  # loads the library that registers torch.ops.dash.*
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for mode in args.modes.split(","):
            for head_dim in [int(d) for d in args.head_dims.split(",")]:
                for batch in [int(b) for b in args.batches.split(",")]:
                    q, k, v, pages, ctx, cu = make_inputs(mode, batch, head_dim)
                    scale = head_dim**-0.5
                    ours = lambda: torch.ops.dash.paged_attention(q, k, v, pages, ctx, cu, scale)  # noqa: E731
                    ref = reference(mode, q, k, v, pages, ctx, cu, scale)
                    diff = float((ours() - ref()).abs().max())
                    if diff > AGREE_ATOL:
                        raise SystemExit(f"C++ and reference disagree by {diff:.2e} at {mode} B={len(ctx)} "
                                         f"D={head_dim}")
                    c_min, c_med = time_calls(ours, args.repeats)
                    r_min, r_med = time_calls(ref, args.repeats)
                    rows.append({"threads": threads, "mode": mode, "head_dim": head_dim, "batch": len(ctx),
                                 "cpp_ms_min": c_min, "cpp_ms_p50": c_med, "ref_ms_min": r_min, "ref_ms_p50": r_med,
                                 "speedup_p50": r_med / c_med, "max_abs_diff": diff})
    record = result("paged_attention", "cpu", rows=rows)
    lines = [f"paged attention, {record['timestamp']}, cpu, git {record['git_sha']}, 1-min load average "
             f"{record['load_avg_1m']:.2f}: ms per call (min and "
             f"median of {args.repeats} calls, hot cache); C++ = torch.ops.dash.paged_attention, SDPA = the "
             "reference of the mode (see the script's docstring)\n",
             "| threads | mode | D | batch | C++ min | C++ p50 | SDPA min | SDPA p50 | speedup (p50) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['mode']} | {r['head_dim']} | {r['batch']} | {r['cpp_ms_min']:.3f} | "
                     f"{r['cpp_ms_p50']:.3f} | {r['ref_ms_min']:.3f} | {r['ref_ms_p50']:.3f} | "
                     f"{r['speedup_p50']:.1f}x |")
    emit("\n".join(lines), record, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
