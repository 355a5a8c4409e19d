"""Fused log-prob loss, forward and backward apart, at the DASH micro-batch shape on one GPU: dash_kernels against
the naive path, torch's linear_cross_entropy and Liger-Kernel's fused linear cross entropy. `make gpu-check` runs
it (step bench_fused_loss_gpu); the CPU benchmark of the same ops is benchmarks/fused_loss.py.

    python benchmarks/fused_loss_gpu.py                                       # N=16384, H=896, V=151936, bf16
    python benchmarks/fused_loss_gpu.py --device cpu --n 512 --h 64 --v 1000  # CPU dry run of the same code
    TRITON_INTERPRET=1 DASH_KERNELS_BACKEND=triton python benchmarks/fused_loss_gpu.py --device cpu --n 64 --h 32 \
        --v 300 --dtype float32 --repeats 1 --warmup 0      # the Triton kernels (and Liger's) under the interpreter

Every variant computes the mean cross-entropy -mean_t log p(y_t) from hidden [N, H] and the lm_head weight [V, H]
(bf16, no bias, temperature 1) and back-propagates to both:
  naive     F.cross_entropy(h @ W^T, y): the [N, V] bf16 logits and their fp32 softmax exist
  fused     -dash_kernels.token_logprobs(h, W, y).mean(): Triton forward, three-kernel backward (6NHV, recompute)
  torch_lce F.linear_cross_entropy(h, W, y, options=LinearCrossEntropyOptions()), torch's chunked path; skipped
            with a message on a torch without it (torch 2.13 has it)
  liger     liger_kernel's LigerFusedLinearCrossEntropyFunction (reduction mean: its gradient GEMMs run inside the
            forward, so compare its fwd+bwd total); skipped with a message when liger_kernel does not import
Timing: the median of --repeats runs after --warmup, forward and backward each between two synchronising clocks
(CUDA events would need one sync per pair as well). TFLOP/s counts the useful GEMMs: 2NHV forward, 4NHV backward.
Memory: peak allocated during forward + backward above what was allocated before, minus the two gradients.
Prints a table, then one JSON line with fused_fwd_peak_frac (fused forward TFLOP/s over H100_DENSE_BF16_TFLOPS),
fused_bwd_over_fwd, fused_mem_frac_naive, fused_vs_liger (Liger's total time over ours) and each variant's row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dash_kernels import token_logprobs  # noqa: E402

H100_DENSE_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 tensor-core peak (no sparsity), the yardstick
SHAPE = (16384, 896, 151936)  # a DASH micro-batch of Qwen2.5-0.5B: N tokens, hidden, vocabulary
VARIANTS = ("naive", "fused", "torch_lce", "liger")


def _liger():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip, and say why
        return None, f"liger_kernel does not import ({type(exc).__name__}: {exc}); make gpu-wheels ships it"
    return LigerFusedLinearCrossEntropyFunction, ""


def loss_fn(variant, device):
    """(fn(h, w, y) -> scalar loss, None) or (None, reason it is skipped)."""
    if variant == "naive":
        return (lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y)), None
    if variant == "fused":
        return (lambda h, w, y: -token_logprobs(h, w, y).mean()), None
    if variant == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            return None, f"torch {torch.__version__} has no F.linear_cross_entropy"
        opts_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        opts = opts_cls() if opts_cls is not None else None
        return (lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts)), None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "Liger-Kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1) only"
    fn, why = _liger()
    if fn is None:
        return None, why

    def liger(h, w, y):
        out = fn.apply(h, w, y)
        return out[0] if isinstance(out, tuple) else out

    return liger, None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant, fn, h0, w0, y, repeats, warmup):
    """Median forward and backward seconds, and the extra peak bytes of one forward + backward."""
    device = h0.device
    fwd, bwd = [], []
    extra = None
    for i in range(warmup + repeats):
        h = h0.detach().requires_grad_()
        w = w0.detach().requires_grad_()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        loss = fn(h, w, y)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        if device.type == "cuda" and extra is None:
            grads = sum(g.numel() * g.element_size() for g in (h.grad, w.grad))
            extra = torch.cuda.max_memory_allocated(device) - base - grads
        if i >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        del loss, h, w
    return statistics.median(fwd), statistics.median(bwd), extra


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=SHAPE[0])
    ap.add_argument("--h", type=int, default=SHAPE[1])
    ap.add_argument("--v", type=int, default=SHAPE[2])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="runs before timing (Triton compiles on the first)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    N, H, V = args.n, args.h, args.v
    g = torch.Generator(device="cpu").manual_seed(0)
    h0 = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    w0 = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(device=device, dtype=dtype)  # peaked logits
    y = torch.randint(0, V, (N,), generator=g).to(device)
    flops_fwd, flops_bwd = 2.0 * N * H * V, 4.0 * N * H * V
    rows, skipped = {}, {}
    for variant in args.variants.split(","):
        fn, why = loss_fn(variant, device)
        if fn is None:
            skipped[variant] = why
            print(f"[fused_loss_gpu] {variant}: skipped: {why}", flush=True)
            continue
        try:
            f, b, extra = measure(variant, fn, h0, w0, y, args.repeats, args.warmup)
        except torch.OutOfMemoryError as exc:
            skipped[variant] = f"out of memory: {str(exc)[:120]}"
            torch.cuda.empty_cache()
            continue
        rows[variant] = {"fwd_ms": round(f * 1e3, 3), "bwd_ms": round(b * 1e3, 3), "total_ms": round((f + b) * 1e3, 3),
                         "fwd_tflops": round(flops_fwd / f / 1e12, 2), "bwd_tflops": round(flops_bwd / b / 1e12, 2),
                         "extra_mib": None if extra is None else round(extra / 2**20, 1)}
    print(f"\nN={N} H={H} V={V} {args.dtype} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    print(f"{'variant':10s} {'fwd ms':>9s} {'bwd ms':>9s} {'total ms':>9s} {'fwd TF/s':>9s} {'bwd TF/s':>9s} "
          f"{'extra MiB':>10s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['fwd_ms']:9.3f} {r['bwd_ms']:9.3f} {r['total_ms']:9.3f} {r['fwd_tflops']:9.2f} "
              f"{r['bwd_tflops']:9.2f} {str(r['extra_mib']):>10s}")
    fused, naive, liger = rows.get("fused"), rows.get("naive"), rows.get("liger")
    summary = {"bench": "fused_loss_gpu", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "shape": [N, H, V], "dtype": args.dtype, "torch": torch.__version__,
               "peak_tflops": H100_DENSE_BF16_TFLOPS, "variants": rows, "skipped": skipped}
    if fused:
        summary["fused_fwd_peak_frac"] = round(fused["fwd_tflops"] / H100_DENSE_BF16_TFLOPS, 4)
        summary["fused_bwd_over_fwd"] = round(fused["bwd_ms"] / fused["fwd_ms"], 3)
        if naive and naive["extra_mib"] and fused["extra_mib"] is not None:
            summary["fused_mem_frac_naive"] = round(fused["extra_mib"] / naive["extra_mib"], 4)
        if liger:
            summary["fused_vs_liger"] = round(liger["total_ms"] / fused["total_ms"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
