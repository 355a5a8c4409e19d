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
JSON: decode_step_ms_256, launches_per_step_256, kernels_per_step_256.
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

    def call(new: int):
        params = SamplingParams(temperature=sampling["temperature"], top_k=sampling["top_k"],
                                top_p=sampling["top_p"], max_new_tokens=new, stop_token_ids=[], seed=0)
        return lambda: generate(model, None, prompts, params=params, page_size=sampling["page_size"])

    for n in (T_SHORT, T_LONG):  # warm-up of both: compilation, autotuning, graph capture, allocator growth
        call(n)()
    times = {T_SHORT: [], T_LONG: []}
    for _ in range(args.repeats):  # interleaved, so a drift in clocks or load hits both alike
        for n in times:
            times[n].append(timed(call(n), device))
    secs = {n: min(t) for n, t in times.items()}
    counts = {n: count_events(call(n), device) for n in (T_SHORT, T_LONG)}
    launches, events = ({n: c[i] for n, c in counts.items()} for i in (0, 1))
    steps = T_LONG - T_SHORT
    step_ms = (secs[T_LONG] - secs[T_SHORT]) / steps * 1e3
    per_step = (launches[T_LONG] - launches[T_SHORT]) / steps
    kernels_per_step = (events[T_LONG] - events[T_SHORT]) / steps
    unit = "launches" if device == "cuda" else "CPU ops"
    record = result("decode_step", device, dry_run=args.dry_run, model=shape["model"], dtype=str(shape["dtype"])[6:],
                    batch=batch, context=shape["context"], new_tokens=[T_SHORT, T_LONG], repeats=args.repeats,
                    sampling={k: sampling[k] for k in ("temperature", "top_k", "top_p", "page_size")},
                    call_s={str(n): round(s, 4) for n, s in secs.items()},
                    launches={str(n): e for n, e in launches.items()}, events={str(n): e for n, e in events.items()},
                    event_unit=unit, **{f"decode_step_ms_{batch}": round(step_ms, 4),
                                        f"launches_per_step_{batch}": round(per_step, 1),
                                        f"kernels_per_step_{batch}": round(kernels_per_step, 1)})
    lines = [f"engine decode step, random {shape['model']} ({record['dtype']}), {device}, batch {batch}, "
             f"{shape['context']}-token prompts, {T_SHORT} vs {T_LONG} new tokens"
             + (" (CPU dry run: numbers mean nothing)" if args.dry_run else ""),
             f"{'new tokens':>10s} {'call s':>9s} {unit:>9s} {'kernels':>9s}"]
    lines += [f"{n:10d} {secs[n]:9.4f} {launches[n]:9d} {events[n]:9d}" for n in (T_SHORT, T_LONG)]
    lines.append(f"per decode step: {step_ms:.3f} ms, {per_step:.1f} {unit}, {kernels_per_step:.1f} kernels")
    emit("\n".join(lines), record, args.out or None, fenced=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
