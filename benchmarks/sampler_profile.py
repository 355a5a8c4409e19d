"""Where one sampler call's time goes: tiny model, batch 256, the sampler benchmark's settings, against HF generate.

    .venv/bin/python benchmarks/sampler_profile.py --threads 2 --out benchmarks/results/sampler_profile

Wall-clock timers wrap the engine's stages for whole calls (best of --repeats rounds, HF interleaved):
- linear: every `torch.nn.functional.linear` (the q/k/v/o, MLP and lm_head GEMMs, the same ones HF runs);
- attention: the paged decode attention and the prefill's varlen attention;
- sample: the fused token sampling; schedule / postprocess: the host-side scheduler;
- other: the rest of the call (norms, RoPE, SiLU, KV stores, embedding, Python).
`hf_over_linear` = HF's call / dash's linear time: the most dash / HF can reach while the GEMMs cost what they do
(the issue's 3x needs it above 3). Prints a table, then ONE JSON line.
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
import torch.nn.functional as F  # noqa: E402

import dash.engine.runner as runner_mod  # noqa: E402
import dash.engine.sampler as sampler_mod  # noqa: E402
from dash.engine import SamplingParams, generate  # noqa: E402
from sampler import NEW_TOKENS, PROMPT_LEN, TEMPERATURE, _git_sha, build, emit, hf_generate  # noqa: E402

BATCH = 256
STAGES = ["linear", "attention", "sample", "schedule", "postprocess"]


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


def instrument(acc: dict) -> None:
    _timed(F, "linear", "linear", acc)
    _timed(runner_mod, "paged_attention", "attention", acc)
    _timed(runner_mod, "varlen_attention", "attention", acc)
    _timed(sampler_mod, "_sample", "sample", acc)
    _timed(sampler_mod.Scheduler, "schedule", "schedule", acc)
    _timed(sampler_mod.Scheduler, "postprocess", "postprocess", acc)


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
    acc: dict = defaultdict(float)
    instrument(acc)
    generate(model, None, prompts, params=sp)  # warm-up (also of the timers' first calls)
    hf_generate(hf, prompts)
    best, hf_best = None, float("inf")
    for _ in range(args.repeats):
        acc.clear()
        t0 = time.perf_counter()
        generate(model, None, prompts, params=sp)
        total = time.perf_counter() - t0
        if best is None or total < best["call"]:
            best = {"call": total, **{s: acc[s] for s in STAGES}}
        t0 = time.perf_counter()
        hf_generate(hf, prompts)
        hf_best = min(hf_best, time.perf_counter() - t0)
    best["other"] = best["call"] - sum(best[s] for s in STAGES)
    ms = {k: round(v * 1e3, 2) for k, v in best.items()}
    result = {"bench": "sampler_profile", "batch": BATCH, **{f"{k}_ms": v for k, v in ms.items()},
              "hf_call_ms": round(hf_best * 1e3, 2), "dash_over_hf": round(hf_best / best["call"], 2),
              "hf_over_linear": round(hf_best / best["linear"], 2), "device": "cpu", "threads": args.threads,
              "torch": torch.__version__, "git_sha": _git_sha(),
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    lines = [f"sampler profile, {result['timestamp']}, cpu, {args.threads} thread(s), tiny model, batch {BATCH}, "
             f"{PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens (best of {args.repeats} calls)\n",
             "| stage | ms | share of the call |", "|---|---|---|"]
    for k in ["call", *STAGES, "other"]:
        lines.append(f"| {k} | {ms[k]:.1f} | {100 * best[k] / best['call']:.0f}% |")
    lines.append(f"| HF generate, whole call | {result['hf_call_ms']:.1f} | |")
    lines.append(f"\ndash / HF: {result['dash_over_hf']}x; HF's call / dash's GEMM time: {result['hf_over_linear']}x "
                 "(the ceiling of dash / HF at this GEMM speed)")
    emit("\n".join(lines), result, args.out)


if __name__ == "__main__":
    main()
