"""Log-prob + policy-loss forward+backward: naive torch vs TRL-style vs torch's linear_cross_entropy vs dash_kernels.

    .venv/bin/python benchmarks/fused_loss.py                      # full shapes, 2 rounds; about 10 minutes on 2 cores
    .venv/bin/python benchmarks/fused_loss.py --quick              # small shapes, a smoke run (~1 minute)
    .venv/bin/python benchmarks/fused_loss.py --out benchmarks/results/fused_loss   # also writes fused_loss.md / .json

Every variant computes the same thing from the last hidden states: per-token log-probs of the sampled tokens under
lm_head (fp32, temperature 1), then the DAPO-normalised PPO-clip loss of `dash_kernels.reference.policy_loss` (beta 0),
then backward to hidden and lm_head weight. Variants:
  naive        logits = h W^T, log_softmax, gather (materialises [N, V] and keeps it for backward)
  trl          TRL's fp32 `selective_log_softmax`: gather, minus a logsumexp looped row by row
  torch_lce    torch.nn.functional.linear_cross_entropy(reduction="none") (default options: materialised), logp = -CE
  torch_lce_chunked   the same with LinearCrossEntropyOptions() (torch's chunked path); opt-in with --variants,
               since on this CPU it ran 17x slower than naive at 512x256x32000 (minutes per run at the full shape)
  fused        dash_kernels.fused_policy_loss (chunked torch backend on CPU, Triton on CUDA)
  fused_half   the same with half of the sequences carrying zero advantage (their rows are skipped entirely)
Each variant runs in a fresh subprocess, once per round; rounds are interleaved (--repeats, default 2) and the table
shows each variant's fastest run, since the box is shared and its load drifts by tens of % within minutes. The
"CPU s" column (user + system time of the worker, all threads, lowest round) is the steadier figure on a busy box:
other users' jobs stretch wall time but not the work done. Memory is the peak beyond the inputs and their gradients:
on CPU the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the inputs exist and a
two-sequence warm-up ran) minus the bytes of d_hidden and d_weight; on CUDA torch.cuda.max_memory_allocated minus the
same. "work skipped" is the fraction of rows (so of the 6NHV GEMM FLOPs) the fused path did not compute. Prints a
table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from common import COMMON_KEYS, emit, result

SEQ_LEN = 256  # tokens per sequence; N = B * SEQ_LEN
MAIN_SHAPE = (2048, 896, 151936)  # Qwen2.5-0.5B head, the target shape
FULL_SHAPES = [MAIN_SHAPE, (2048, 896, 128256)]
QUICK_SHAPES = [(512, 256, 32000)]
VARIANTS = ["naive", "trl", "torch_lce", "fused", "fused_half"]
EXTRA_VARIANTS = ["torch_lce_chunked"]  # opt-in (--variants): 17x slower than naive on this CPU at 512x256x32000
WORKER_TIMEOUT_S = 1200
SECOND_SHAPE_VARIANTS = ["naive", "fused", "fused_half"]  # keep the full run within minutes
RUN_KEYS = ("triton", "threads", "wall_s", "repeats")  # JSON-line keys of a run besides the common ones


# ------------------------------------------------------------------------------------------------ the variants
def _logp_naive(h, w, y):
    logits = h @ w.t()  # [N, V]
    return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _logp_trl(h, w, y):
    logits = h @ w.t()  # [N, V]
    picked = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, -1) for row in logits])  # TRL loops rows to bound the temporaries
    return picked - lse


def _logp_lce(h, w, y, chunked):
    opts = torch.nn.LinearCrossEntropyOptions() if chunked else None
    return -torch.nn.functional.linear_cross_entropy(h, w, y, reduction="none", options=opts)


def _inputs(N, H, V, device, half_zero=False, seed=0):
    """Hidden [B, L, H], weight [V, H] (no temporaries: RSS after this is the baseline), targets, advantages..."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = N // SEQ_LEN
    hidden = torch.empty(B, SEQ_LEN, H).normal_(generator=g).to(device).requires_grad_()
    weight = torch.empty(V, H).normal_(0.0, H ** -0.5, generator=g).to(device).requires_grad_()
    targets = torch.randint(0, V, (B, SEQ_LEN), generator=g).to(device)
    adv = torch.randn(B, generator=g)
    if half_zero:
        adv[::2] = 0.0  # half the sequences: zero advantage (filtered / uninformative groups)
    old = torch.full((B, SEQ_LEN), -12.0)  # ratios away from 1 on some tokens: the clip branch is exercised
    mask = torch.ones(B, SEQ_LEN, dtype=torch.bool)
    return hidden, weight, targets, adv.to(device), mask.to(device), old.to(device)


def run_variant(variant, hidden, weight, targets, adv, mask, old):
    """One forward+backward; returns the loss and the fraction of rows computed (1.0 unless fused)."""
    from dash_kernels import fused_policy_loss
    from dash_kernels.reference import policy_loss

    B, L, H = hidden.shape
    if variant.startswith("fused"):
        loss, metrics = fused_policy_loss(hidden, weight, targets, adv, mask, old, loss_type="dapo")
        computed = float(metrics["loss/active_frac"])
    else:
        h, y = hidden.reshape(B * L, H), targets.reshape(-1)
        logp = {"naive": lambda: _logp_naive(h, weight, y), "trl": lambda: _logp_trl(h, weight, y),
                "torch_lce": lambda: _logp_lce(h, weight, y, False),
                "torch_lce_chunked": lambda: _logp_lce(h, weight, y, True)}[variant]()
        loss, _ = policy_loss(logp.reshape(B, L), old, adv, mask, loss_type="dapo")
        computed = 1.0
    loss.backward()
    return float(loss.detach()), computed


# ---------------------------------------------------------------------------------------------- the worker side
def _proc_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def worker(variant, N, H, V, device):
    torch.manual_seed(0)
    dev = torch.device(device)
    inputs = _inputs(N, H, V, dev, half_zero=variant == "fused_half")
    # Warm up outside the measurement on two sequences of the real inputs (the same weight, so the same BLAS kernels:
    # library init, thread pools and the code pages of the big GEMM kernels are not the op's memory). The warm-up's
    # gradients are dropped, so its weight gradient is freed before the peak is reset.
    hidden, weight = inputs[0], inputs[1]
    warm = (hidden[:2].detach().requires_grad_(), weight, inputs[2][:2], inputs[3][:2], inputs[4][:2], inputs[5][:2])
    run_variant(variant, *warm)
    weight.grad = None
    del warm
    grad_bytes = (N * H + V * H) * 4  # d_hidden and d_weight, fp32
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        base = _proc_status()["VmRSS"]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    loss, computed = run_variant(variant, *inputs)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)  # all threads of this process
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _proc_status()["VmHWM"]
    assert inputs[0].grad is not None and inputs[1].grad is not None
    extra = max(0, peak - base - grad_bytes)
    return {"variant": variant, "N": N, "H": H, "V": V, "device": device, "ms": round(elapsed * 1e3, 1),
            "cpu_s": round(cpu_s, 2),
                "peak_extra_mb": round(extra / 2**20, 1), "loss": loss, "rows_computed_frac": round(computed, 4),
                "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- the driver side
def measure(variant, shape, device):
    N, H, V = shape
    cmd = [sys.executable, __file__, "--worker", variant, "--shape", f"{N}x{H}x{V}", "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "N": N, "H": H, "V": V, "device": device, "error": f"timeout {WORKER_TIMEOUT_S}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"variant": variant, "N": N, "H": H, "V": V, "device": device, "error": last}
    return json.loads(lines[-1])


def render(results, main_shape, device):
    """The table and the benchmark's own fields of the JSON line (no run metadata) from per-variant results."""
    lines = [(f"{'device':6s} {'N x H x V':>20s} {'variant':18s} {'fwd+bwd ms':>11s} {'vs naive':>9s} "
              f"{'CPU s':>7s} {'vs naive':>9s} {'peak extra MiB':>15s} {'work skipped':>13s}")]
    lines.append("-" * len(lines[0]))
    for r in results:
        shape = f"{r['N']}x{r['H']}x{r['V']}"
        if "error" in r:
            lines.append(f"{r['device']:6s} {shape:>20s} {r['variant']:18s} ERROR {r['error']}")
            continue
        naive = next((q for q in results if q["variant"] == "naive" and q["device"] == r["device"]
                      and (q["N"], q["H"], q["V"]) == (r["N"], r["H"], r["V"]) and "ms" in q), None)
        speed = f"{naive['ms'] / r['ms']:.2f}x" if naive else "-"
        cpu_speed = f"{naive['cpu_s'] / r['cpu_s']:.2f}x" if naive else "-"
        lines.append(f"{r['device']:6s} {shape:>20s} {r['variant']:18s} {r['ms']:11.0f} {speed:>9s} "
                     f"{r['cpu_s']:7.1f} {cpu_speed:>9s} {r['peak_extra_mb']:15.1f} "
                     f"{1 - r['rows_computed_frac']:13.0%}")
    main = {r["variant"]: r for r in results if r["device"] == device and (r["N"], r["H"], r["V"]) == tuple(main_shape)
            and "ms" in r}

    def pick(variant, key):
        return main[variant][key] if variant in main else None

    def ratio(a, b, invert=False):
        if a is None or b is None:
            return None
        return round(1 - a / b, 3) if invert else round(a / b, 3)

    fields = {
        "shape": dict(zip("NHV", main_shape)),
        "naive_ms": pick("naive", "ms"), "fused_ms": pick("fused", "ms"),
        "fused_half_filtered_ms": pick("fused_half", "ms"),
        "naive_cpu_s": pick("naive", "cpu_s"), "fused_cpu_s": pick("fused", "cpu_s"),
        "fused_half_filtered_cpu_s": pick("fused_half", "cpu_s"),
        "naive_peak_mb": pick("naive", "peak_extra_mb"), "fused_peak_mb": pick("fused", "peak_extra_mb"),
        "fused_half_filtered_peak_mb": pick("fused_half", "peak_extra_mb"),
        "trl_ms": pick("trl", "ms"), "trl_cpu_s": pick("trl", "cpu_s"), "trl_peak_mb": pick("trl", "peak_extra_mb"),
        "torch_lce_ms": pick("torch_lce", "ms"), "torch_lce_cpu_s": pick("torch_lce", "cpu_s"),
        "torch_lce_peak_mb": pick("torch_lce", "peak_extra_mb"),
        "torch_lce_chunked_ms": pick("torch_lce_chunked", "ms"),
        "torch_lce_chunked_peak_mb": pick("torch_lce_chunked", "peak_extra_mb"),
        "half_filtered_work_skipped": (round(1 - main["fused_half"]["rows_computed_frac"], 4)
                                       if "fused_half" in main else None),
        # ratios: wall time (best round) and CPU time (best round, steadier on a shared box)
        "fused_speedup": ratio(pick("naive", "ms"), pick("fused", "ms")),
        "fused_speedup_cpu": ratio(pick("naive", "cpu_s"), pick("fused", "cpu_s")),
        "half_filtered_time_drop": ratio(pick("fused_half", "ms"), pick("fused", "ms"), invert=True),
        "half_filtered_cpu_drop": ratio(pick("fused_half", "cpu_s"), pick("fused", "cpu_s"), invert=True),
        "fused_peak_frac_of_naive": ratio(pick("fused", "peak_extra_mb"), pick("naive", "peak_extra_mb")),
        "results": results,
    }
    return "\n".join(lines), fields


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes only (smoke run)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: both when CUDA is present, else cpu)")
    ap.add_argument("--variants", default=None, help="comma-separated, from " + ",".join(VARIANTS + EXTRA_VARIANTS))
    ap.add_argument("--out", default=None, help="path prefix: writes <out>.md (table + JSON) and <out>.json")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the table shows the fastest run")
    ap.add_argument("--rerender", default=None, help="re-render the table/JSON from a saved <out>.json (no runs)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        N, H, V = (int(x) for x in args.shape.split("x"))
        print(json.dumps(worker(args.worker, N, H, V, args.device)))
        return

    if args.rerender:
        saved = json.loads(Path(args.rerender).read_text())
        table, fields = render(saved["results"], [saved["shape"][k] for k in "NHV"], saved["device"])
        # the saved run's metadata, not this machine's
        kept = {k: saved.get(k) for k in (*RUN_KEYS, *COMMON_KEYS) if k != "bench"}
        _emit(table, {"bench": "fused_loss", **fields, **kept}, args.out)
        return

    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    chosen = args.variants.split(",") if args.variants else VARIANTS
    t0 = time.perf_counter()
    results = []
    for device in devices:
        for i, shape in enumerate(shapes):
            names = chosen if i == 0 else [v for v in chosen if v in SECOND_SHAPE_VARIANTS]
            runs = {v: [] for v in names}
            for _ in range(args.repeats):  # interleaved rounds: load drifts on a shared box, so compare like with like
                for variant in names:
                    r = measure(variant, shape, device)
                    runs[variant].append(r)
                    print(f"# {device} {shape} {variant}: {r.get('ms', r.get('error'))} ms", file=sys.stderr,
                          flush=True)
            for variant in names:
                ok = [r for r in runs[variant] if "ms" in r]
                best = min(ok, key=lambda r: r["ms"]) if ok else runs[variant][-1]
                if ok:
                    best = dict(best, all_ms=[r["ms"] for r in ok], all_cpu_s=[r["cpu_s"] for r in ok],
                                cpu_s=min(r["cpu_s"] for r in ok))
                results.append(best)
    table, fields = render(results, shapes[0], devices[0])
    _emit(table, result("fused_loss", devices[0], **fields, triton=_triton_version(), threads=torch.get_num_threads(),
                        wall_s=round(time.perf_counter() - t0, 1), repeats=args.repeats), args.out)


def _emit(table, summary, out):
    note = ("Shared 2-core box: other jobs stretch wall times unevenly (see each variant's `all_ms` per round), so "
            "the CPU-time columns are the steadier comparison. Best round per variant.\n")
    emit(table, summary, out, heading=f"# benchmarks/fused_loss.py\n\n{note}\n", fenced=True)


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
