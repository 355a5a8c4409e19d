"""Where one sampler call's time goes: tiny model, batch 256, the sampler benchmark's settings, against HF generate.

    .venv/bin/python benchmarks/sampler_profile.py --threads 2 --out benchmarks/results/sampler_profile

The call and HF's call are timed without instruments (best of --repeats interleaved rounds). The breakdown comes from
one more call under torch.profiler (which adds its own per-op cost, so its stages are reported against that call):
- linear: the self time of every aten::mm / aten::addmm / dash::linear_packed, the q/k/v/o, MLP and lm_head GEMMs
  (the same ones HF runs), whether torch's or the packed AVX-512 ones of the C++ decoder layer (csrc/linear_cpu.cpp,
  with the residual adds and SwiGLU in their epilogues);
- attention: the paged attention kernel (a profiler event of its own) and any varlen SDPA of a prefill;
- sample: the fused token sampling op; schedule / postprocess: the host-side scheduler (wall-clock wrappers);
- other: the rest of the profiled call (norms, RoPE, SiLU, KV stores, embedding, Python).
Stages count the calling thread's events only: a decode step on packed weights runs each decoder layer as one
parallel region where every thread takes a block of rows through the whole layer, so the other thread's events
overlap the caller's in time (their sum would exceed the wall time); the caller's share is the stage's wall time.
`hf_over_linear` = HF's call / the GEMM time: the most dash / HF can reach while the GEMMs cost what they do (the
issue's 3x needs it above 3). Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import dash.engine.generation as sampler_mod  # noqa: E402
from dash.engine import SamplingParams, generate  # noqa: E402
from common import emit, result  # noqa: E402
from sampler import NEW_TOKENS, PROMPT_LEN, TEMPERATURE, build, hf_generate  # noqa: E402

BATCH = 256
CALL_EVENT = "sampler_profile.call"
STAGES = ["linear", "attention", "sample", "schedule", "postprocess"]
# Profiler event names (self time) per kernel stage.
PROFILED = {"linear": ("aten::mm", "aten::addmm", "dash::linear_packed"),
            "attention": ("dash::paged_attention", "scaled_dot_product"), "sample": ("dash::sample_rows",)}


def _timed(owner, name: str, stage: str, acc: dict) -> None:
    """Replace owner.name by a wrapper that adds its wall time to acc[stage]."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[stage] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def profiled_call(run) -> dict:
    """Seconds per stage of one call of `run` under torch.profiler (+ "call", the profiled call's wall time)."""
    acc: dict = defaultdict(float)
    _timed(sampler_mod.Scheduler, "schedule", "schedule", acc)
    _timed(sampler_mod.Scheduler, "postprocess", "postprocess", acc)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        with record_function(CALL_EVENT):
            run()
        acc["call"] = time.perf_counter() - t0
    events = prof.events()
    caller = next(e.thread for e in events if e.name == CALL_EVENT)
    for event in events:  # the calling thread's share of each stage (see the module docstring)
        if event.thread != caller:
            continue
        for stage, names in PROFILED.items():
            if any(n in event.name for n in names):
                acc[stage] += event.self_cpu_time_total / 1e6
    acc["other"] = acc["call"] - sum(acc[s] for s in STAGES)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="", help="also write <out>.md (table) and <out>.json (the JSON line)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf, model = build("tiny", Path(tempfile.mkdtemp()))
    prompts = torch.randint(3, model.config.vocab_size, (BATCH, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(BATCH)).tolist()
    sp = SamplingParams(temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS, stop_token_ids=[], seed=0)
    run = lambda: generate(model, None, prompts, params=sp)  # noqa: E731
    run()  # warm-up
    hf_generate(hf, prompts)
    best, hf_best = float("inf"), float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf_generate(hf, prompts)
        hf_best = min(hf_best, time.perf_counter() - t0)
    prof = profiled_call(run)
    ms = {k: round(v * 1e3, 2) for k, v in prof.items()}
    record = result("sampler_profile", "cpu", batch=BATCH, call_ms=round(best * 1e3, 2), profiled_call_ms=ms["call"],
                    **{f"{k}_ms": ms[k] for k in [*STAGES, "other"]}, hf_call_ms=round(hf_best * 1e3, 2),
                    dash_over_hf=round(hf_best / best, 2), hf_over_linear=round(hf_best / prof["linear"], 2),
                    threads=args.threads)
    lines = [f"sampler profile, {record['timestamp']}, cpu, {args.threads} thread(s), tiny model, batch {BATCH}, "
             f"{PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens\n",
             f"dash call {record['call_ms']:.1f} ms, HF generate {record['hf_call_ms']:.1f} ms (best of "
             f"{args.repeats} interleaved calls each, no profiler). One more call under torch.profiler:\n",
             "| stage | ms | share of the profiled call |", "|---|---|---|"]
    for k in ["call", *STAGES, "other"]:
        lines.append(f"| {k} | {ms[k]:.1f} | {100 * prof[k] / prof['call']:.0f}% |")
    lines.append(f"\ndash / HF: {record['dash_over_hf']}x; HF's call / dash's GEMM time: {record['hf_over_linear']}x "
                 "(the ceiling of dash / HF at this GEMM speed)")
    emit("\n".join(lines), record, args.out)


if __name__ == "__main__":
    main()
