"""Engine decode step on one GPU: milliseconds and kernel launches per decode step of `dash.engine.generate`, a
random Qwen2.5-0.5B-shaped model in bf16 (benchmarks/random_qwen.py), batch 256, ~1k-token contexts.

    python benchmarks/decode_step.py                  # CUDA: batch 256, 1024-token prompts (`make gpu-check`)
    python benchmarks/decode_step.py --dry-run        # CPU, tiny model: the same code (ops, not kernels, counted)

Only the engine's public `generate` is used, so the number holds whatever the step does inside (CUDA graphs,
samplers): two calls with the same prompts differ only in their decode steps, T_SHORT vs T_LONG new tokens, so
    step ms          = (time(T_LONG) - time(T_SHORT)) / (T_LONG - T_SHORT)
    launches / step  = (launches(T_LONG) - launches(T_SHORT)) / (T_LONG - T_SHORT), and kernels / step alike
with the prefill, set-up and the last copies cancelling out. Times: best of --repeats interleaved calls after one
warm-up call of each, the device drained around each. Launches: the CUDA launch API calls that torch.profiler
records on the host (a CUDA graph replay is one); kernels: its CUDA-device events (kernels, memcpy, memset); both
from one more call of each. EOS is ignored (stop_token_ids []), so every row makes exactly its new
tokens; sampling as configs/qwen2.5-0.5b-math.yaml (temperature 0.9, top-k 50, page 256). The issue's target:
<= 3 ms a step at batch 256 (the 1 GB of bf16 weights alone take ~0.3 ms to read at H100 bandwidth).
Two rows per measurement: `graphs` (generate's default: decode steps replayed from CUDA graphs, dash/engine/
cuda_graphs.py; the capture happens in both calls of a pair and cancels out) and `eager` (cuda_graphs=False). On
CPU both rows run eagerly (graphs fall back to eager there: graph_steps 0). Graph rows not measured on a GPU yet.
JSON: decode_step_ms_256, launches_per_step_256, kernels_per_step_256 (graphs on), the same keys with an _eager
suffix (graphs off), graph_steps (decode steps a CUDA graph served, per mode, in the T_LONG call).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from dash.engine import SamplingParams, generate  # noqa: E402
from dash.model_io import load_model  # noqa: E402
from common import emit, result  # noqa: E402
from random_qwen import write_model  # noqa: E402

PRESET = ROOT / "configs/qwen2.5-0.5b-math.yaml"
T_SHORT, T_LONG = 8, 40  # new tokens of the two calls: 32 decode steps apart, contexts ~1032-1064
GPU = {"batch": 256, "context": 1024, "model": "qwen2.5-0.5b", "dtype": torch.bfloat16}
DRY = {"batch": 4, "context": 32, "model": "tiny", "dtype": torch.float32}
# Name prefixes of the CUDA runtime / driver calls that enqueue work (kernels, Triton's cuLaunchKernelEx, graph
# replays, copies, memsets); prefixes, because traces may carry versioned names (cudaLaunchKernelExC_v11060)
MODES = {"graphs": True, "eager": False}  # row name -> generate's cuda_graphs
LAUNCH_CALLS = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch", "cudaMemcpy", "cuMemcpy", "cudaMemset",
                "cuMemset")


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def count_events(fn, device: str) -> tuple[int, int]:
    """(host launch calls, device events) of one call. Launch calls are the CUDA runtime / driver calls that put
    work on a stream (LAUNCH_CALLS: a replayed CUDA graph is one call); device events are what ran there (kernels,
    memcpy, memset, graph kernels included). On CPU (dry run) both are the CPU ops the profiler records."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device != "cuda":
        return len(events), len(events)
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    launches = sum(1 for e in events if e.device_type == cpu and e.name.startswith(LAUNCH_CALLS))
    return launches, sum(1 for e in events if e.device_type == gpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, batch 4, 32-token prompts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="", help="also write <out>.md and <out>.json")
    args = ap.parse_args()
    shape, device = (DRY, "cpu") if args.dry_run else (GPU, "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode_step.py: no CUDA device (use --dry-run on CPU)")
    sampling = yaml.safe_load(PRESET.read_text())["sampling"]
    model = load_model(write_model(Path(tempfile.mkdtemp()) / "model", shape["model"], shape["dtype"]),
                       shape["dtype"], device)
    batch = shape["batch"]
    prompts = torch.randint(3, model.config.vocab_size, (batch, shape["context"]),
                            generator=torch.Generator().manual_seed(0)).tolist()

    def call(new: int, graphs: bool, stats: dict | None = None):
        params = SamplingParams(temperature=sampling["temperature"], top_k=sampling["top_k"],
                                top_p=sampling["top_p"], max_new_tokens=new, stop_token_ids=[], seed=0)
        return lambda: generate(model, None, prompts, params=params, page_size=sampling["page_size"],
                                cuda_graphs=graphs, stats=stats)

    keys = [(mode, n) for mode in MODES for n in (T_SHORT, T_LONG)]
    for mode, n in keys:  # warm-up of each: compilation, autotuning, graph capture, allocator growth
        call(n, MODES[mode])()
    times = {key: [] for key in keys}
    for _ in range(args.repeats):  # interleaved, so a drift in clocks or load hits every row alike
        for mode, n in keys:
            times[mode, n].append(timed(call(n, MODES[mode]), device))
    secs = {key: min(t) for key, t in times.items()}
    counts = {(mode, n): count_events(call(n, MODES[mode]), device) for mode, n in keys}
    graph_steps = {}
    for mode in MODES:
        stats = {}
        call(T_LONG, MODES[mode], stats)()
        graph_steps[mode] = stats["graph_steps"]
    steps = T_LONG - T_SHORT
    per_step = {}  # mode -> (ms, launches, kernels) per decode step
    for mode in MODES:
        (l_short, e_short), (l_long, e_long) = counts[mode, T_SHORT], counts[mode, T_LONG]
        per_step[mode] = ((secs[mode, T_LONG] - secs[mode, T_SHORT]) / steps * 1e3, (l_long - l_short) / steps,
                          (e_long - e_short) / steps)
    unit = "launches" if device == "cuda" else "CPU ops"
    metrics = {}
    for mode, suffix in (("graphs", ""), ("eager", "_eager")):
        ms, launches, kernels = per_step[mode]
        metrics.update({f"decode_step_ms_{batch}{suffix}": round(ms, 4),
                        f"launches_per_step_{batch}{suffix}": round(launches, 1),
                        f"kernels_per_step_{batch}{suffix}": round(kernels, 1)})
    record = result("decode_step", device, dry_run=args.dry_run, model=shape["model"], dtype=str(shape["dtype"])[6:],
                    batch=batch, context=shape["context"], new_tokens=[T_SHORT, T_LONG], repeats=args.repeats,
                    sampling={k: sampling[k] for k in ("temperature", "top_k", "top_p", "page_size")},
                    call_s={f"{m}/{n}": round(t, 4) for (m, n), t in secs.items()},
                    launches={f"{m}/{n}": c[0] for (m, n), c in counts.items()},
                    events={f"{m}/{n}": c[1] for (m, n), c in counts.items()},
                    event_unit=unit, graph_steps=graph_steps, **metrics)
    lines = [f"engine decode step, random {shape['model']} ({record['dtype']}), {device}, batch {batch}, "
             f"{shape['context']}-token prompts, {T_SHORT} vs {T_LONG} new tokens"
             + (" (CPU dry run: numbers mean nothing)" if args.dry_run else ""),
             f"{'mode':>7s} {'new tokens':>10s} {'call s':>9s} {unit:>9s} {'kernels':>9s}"]
    lines += [f"{m:>7s} {n:10d} {secs[m, n]:9.4f} {counts[m, n][0]:9d} {counts[m, n][1]:9d}" for m, n in keys]
    for mode in MODES:
        ms, launches, kernels = per_step[mode]
        note = "" if graph_steps[mode] or not MODES[mode] else " (no CUDA graph ran: eager fallback)"
        lines.append(f"per decode step, {mode}: {ms:.3f} ms, {launches:.1f} {unit}, {kernels:.1f} kernels, "
                     f"{graph_steps[mode]} of {T_LONG - 1} steps from CUDA graphs{note}")
    emit("\n".join(lines), record, args.out or None, fenced=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
