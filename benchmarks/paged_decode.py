"""GPU decode attention over the paged KV cache: the grouped-query Triton kernel (dash_kernels.paged_attention) vs
the gather + SDPA reference, ms per call (one layer), at a Qwen2.5-0.5B shape.

    python benchmarks/paged_decode.py                        # CUDA: batch 256 and 8, 1k-token contexts (~20 s)
    python benchmarks/paged_decode.py --dry-run              # CPU: the Triton interpreter, tiny shapes (checks code)

The dry run uses fp32: the Triton 3.9 interpreter does not support tl.dot on bf16 (triton-lang/triton#11584).

Shape: 14 query / 2 KV heads of 64 (GQA group 7), bf16, page size 256 (the presets), every sequence at `--context`
tokens, pages scattered over the pool as in a running engine. Rows: the kernel with its split heuristic
(`decode_num_splits`), the kernel forced to one split, and the reference. Before timing, the kernel must agree with
an fp64 reference within 2x the bf16 reference's own error (as tests/kernels/interp_paged_cases.py). GB/s counts the
K/V bytes one call must read (B * context * Hkv * D * 2 tensors). `.ci/gpu_check.py` runs it; the one JSON line
holds `decode_attn_ms_256` (heuristic, batch 256).
Times: `triton.testing.do_bench` median on CUDA; the dry run times one interpreted call (meaningless as speed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

HQ, HKV, HEAD_DIM, PAGE = 14, 2, 64, 256  # Qwen2.5-0.5B attention, the presets' page size
AGREE_FACTOR = 2.0  # ours within 2x the bf16 reference's error against fp64 (+ a 2e-6 * max|ref| floor)


def make_inputs(batch: int, context: int, device: str, dtype, seed: int = 0):
    """q [B, Hq, D], caches [pool, PAGE, Hkv, D], page table [B, W] (scattered pages), context lens [B]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    width = -(-context // PAGE)
    pool = batch * width + 1
    table = torch.randperm(pool, generator=g)[: batch * width].view(batch, width).to(torch.int32)
    k = torch.randn(pool, PAGE, HKV, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(pool, PAGE, HKV, HEAD_DIM, generator=g).to(dtype)
    q = torch.randn(batch, HQ, HEAD_DIM, generator=g).to(dtype)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return [t.to(device) for t in (q, k, v, table, lens)]


def time_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="256,8")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1, batch 2, 300 tokens")
    ap.add_argument("--out", default="", help="also write <out>.md and <out>.json")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (below)
        args.batches, args.context = "2", 300
    import torch

    from common import emit, result
    from dash_kernels import backend
    from dash_kernels import paged_attention as pa

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("paged_decode.py: no CUDA device (use --dry-run on CPU)")
    num_sms = pa._num_sms(torch.device(device))
    scale = HEAD_DIM**-0.5
    rows = []
    with backend.use_backend("triton"), torch.inference_mode():
        for batch in [int(b) for b in args.batches.split(",")]:
            q, k, v, table, lens = make_inputs(batch, args.context, device, dtype)
            cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
            splits = pa.decode_num_splits(batch, HKV, table.shape[1] * PAGE, num_sms)
            ours = pa.paged_attention_fwd(q, k, v, table, lens, cu, 1, scale)
            ref = pa.paged_attention_ref(q.double(), k.double(), v.double(), table, lens, None, scale)
            naive = pa.paged_attention_ref(q, k, v, table, lens, None, scale)
            err, err_naive = ((t.double() - ref).abs().max().item() for t in (ours, naive))
            if err > AGREE_FACTOR * err_naive + 2e-6 * ref.abs().max().item():
                raise SystemExit(f"paged_decode.py: kernel error {err:.3e} > {AGREE_FACTOR} x reference error "
                                 f"{err_naive:.3e} at batch {batch}")
            kv_bytes = 2 * batch * args.context * HKV * HEAD_DIM * k.element_size()
            variants = {f"triton, {splits} split(s)": lambda: pa.paged_attention_fwd(q, k, v, table, lens, cu, 1,
                                                                                      scale),
                        "triton, 1 split": lambda: pa.paged_attention_fwd(q, k, v, table, lens, cu, 1, scale,
                                                                           num_splits=1),
                        "gather + SDPA": lambda: pa.paged_attention_ref(q, k, v, table, lens, None, scale)}
            for name, fn in variants.items():
                ms = time_ms(fn, device)
                rows.append({"batch": batch, "context": args.context, "variant": name, "splits": splits,
                             "ms": ms, "kv_gb_s": kv_bytes / ms / 1e6, "max_abs_err": err})
    record = result("paged_decode", device, dry_run=args.dry_run, num_sms=num_sms,
                    shape={"hq": HQ, "hkv": HKV, "head_dim": HEAD_DIM, "page_size": PAGE, "dtype": str(dtype)[6:]},
                    decode_attn_ms_256=next((r["ms"] for r in rows if r["batch"] == 256 and "split(s)" in r["variant"]),
                                            None), rows=rows)
    lines = [f"decode attention, one layer, Qwen2.5-0.5B heads (14 / 2 x 64), {str(dtype)[6:]}, page {PAGE}, {device}"
             f"{' (interpreter dry run: times mean nothing)' if args.dry_run else ''}",
             f"{'batch':>6s} {'context':>8s}  {'variant':24s} {'ms/call':>9s} {'K/V GB/s':>9s}"]
    for r in rows:
        lines.append(f"{r['batch']:6d} {r['context']:8d}  {r['variant']:24s} {r['ms']:9.4f} {r['kv_gb_s']:9.1f}")
    emit("\n".join(lines), record, args.out or None, fenced=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
