"""Sampler throughput: dash.engine.generate vs HF `generate` (padded batch) and HF `generate_batch` (continuous
batching), same weights, prompts, lengths and sampling settings; plus the host-side scheduling cost per decode step.

    .venv/bin/python benchmarks/sampler.py                 # full table (a few minutes on 2 cores)
    .venv/bin/python benchmarks/sampler.py --quick         # tiny model only
    .venv/bin/python benchmarks/sampler.py --threads 2 --out benchmarks/results/sampler

Models (random Qwen2-shaped, fp32): `tiny` = 2 layers, hidden 128, vocab 48 (first reference measurement: HF ~1.5k tok/s
at batch 8, ~17k at 256 on an idle 2-core box); `wide` = 2 layers, hidden 512, vocab 32000 (compute-bound).
Settings: prompts of 16 random tokens, 32 new tokens, temperature 0.9, no top-k / top-p, EOS ignored so every row
generates exactly 32 tokens (tok/s = generated tokens / wall time). Batch 8 (the GRPO micro-batch) and 256 (the DASH
step batch); the fork rows use 64 prompts x G=4 (2 x 4 at batch 8) with and without group fork.
HF `generate_batch` (transformers' continuous batching) runs only with --hf-cb: on this CPU its default cache sizing
takes ~12 GiB of RSS and it produced ~10 tok/s at batch 8 and ~270 tok/s at batch 256 (one run, 2026-11-25).
tok/s is from the best of --repeats interleaved rounds (the box is shared; see `measure`). Peak memory is the rise of
the process's peak RSS during a call (VmHWM reset through /proc/self/clear_refs; 0 when below RSS noise).
Shared-prefix rows (tiny, batch 256): every prompt is one SYSTEM_LEN-token "system prompt" + its own PROMPT_LEN
tokens, as with a chat template; dash with prefix caching (the default) vs without, and HF generate.
Ragged rows (tiny, batch 256): prompt lengths uniform in RAGGED_LEN, as RL prompts are; HF generate takes them as one
left-padded batch with an attention mask (its documented way), dash packs them.
`sched_overhead_ms_1024`: mean wall time of the host-side step (Scheduler.schedule + postprocess, no model, no
sampling) over decode steps with 1024 live sequences (256 prompts x G=4).
Presets' sampling rows (`tiny1k`: the tiny model with a 1000-token vocabulary, batch 256, temperature 0.9): without
top-k, with the presets' top_k = 50 (configs/qwen2.5-*-math.yaml; their top_p is 1.0, off) in the fused sampler,
with top_k = 50 through the pre-fusion torch path (a full sort of the [B, V] logits, softmax, cumsum, scatter, then
inverse CDF: `_sample_sorted`, kept here as the "before" of the same run), and HF generate without / with top-k 50.
`--presets-only` runs just these rows.
`--gpu` (what `make gpu-check` runs) instead times a random Qwen2.5-0.5B-shaped model (benchmarks/random_qwen.py) in
bf16 on CUDA: dash vs HF `generate` at batch 8 and 256, 256-token prompts, 512 new tokens, the sampling section of
configs/qwen2.5-0.5b-math.yaml (temperature 0.9, top-k 50, top-p 1.0, page 256); `--hf-new-tokens-256` shortens
HF's batch-256 run to fit a time budget (the table and JSON say so). JSON: `sampler_vs_hf_{8,256}` (tok/s ratios).
`--gpu --dry-run` runs the same code on CPU at a tiny shape (the smoke test).
Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import dash.engine.generation as sampler_mod  # noqa: E402
from dash.engine import SamplingParams, generate  # noqa: E402
from dash.engine.logits_processing import uniforms_at  # noqa: E402
from dash.engine.kv_cache import KVCache  # noqa: E402
from dash.engine.scheduler import Scheduler  # noqa: E402
from dash.engine.sequence import SequenceTable  # noqa: E402
from dash.model_io import load_model  # noqa: E402
from dash_kernels.sample_rows import mask_stop_tokens, sample_from_logp  # noqa: E402
from common import emit, result  # noqa: E402

PROMPT_LEN, NEW_TOKENS, TEMPERATURE = 16, 32, 0.9
SYSTEM_LEN = 48  # shared-prefix rows: 3 full pages of 16 reused by every prompt after the first
RAGGED_LEN = (8, 24)  # ragged rows: prompt lengths uniform in this range (mean PROMPT_LEN)
MODELS = {
    "tiny": dict(vocab_size=48, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "wide": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2),
    "tiny1k": dict(vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2),
}
PRESET_TOP_K = 50  # configs/qwen2.5-0.5b-math.yaml and -1.5b-math.yaml (top_p 1.0)
SCHED_SEQS, SCHED_STEPS = 1024, 30


def _peak_rss_reset() -> int:
    """Reset the peak-RSS counter; returns the current RSS in bytes (Linux only, else 0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")
    except OSError:
        return 0


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(runs: dict, repeats: int) -> dict:
    """provider -> (best seconds, peak MiB above the starting RSS), or the exception it raised.

    The machine is shared, so providers are interleaved round by round (load drifts hit all of them alike) and the
    best round is kept (noise only ever adds time). Each provider gets one warm-up call first.
    """
    out, times = {}, {}
    for name, fn in runs.items():
        try:
            fn()
            times[name], out[name] = [], [0.0, 0.0]
        except Exception as err:  # an HF path this version cannot run on CPU: reported, not fatal
            out[name] = err
    for _ in range(repeats):
        for name in times:
            base = _peak_rss_reset()
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
            out[name][1] = max(out[name][1], max(0, _status("VmHWM") - base) / 2**20)
    for name in times:
        out[name][0] = min(times[name])
    return out


def build(name: str, folder: Path):
    config = transformers.Qwen2Config(**MODELS[name], max_position_embeddings=256, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None  # every row generates NEW_TOKENS tokens, as in the dash runs
    return hf, load_model(folder)


def hf_generate(hf, prompts, top_k=0):
    """One padded batch, left-padded as HF generate needs for ragged prompts (equal lengths: no padding at all)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # [B, width]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE, top_k=top_k,
                    top_p=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)


def _process_sorted(logits, temperature, top_k, top_p):
    """The pre-fusion processing (full sort of [B, V]), for the benchmark's "before" row only."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    x = logits / t[:, None]  # [B, V]
    V = x.shape[1]
    ranked, order = x.sort(dim=1, descending=True)  # [B, V]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # [B]
    keep = torch.arange(V, device=x.device)[None, :] < k[:, None]
    ranked = ranked.masked_fill(~keep, float("-inf"))
    probs = ranked.softmax(dim=1)
    keep &= probs.cumsum(dim=1) - probs < top_p[:, None]
    x = torch.full_like(x, float("-inf")).scatter_(1, order, ranked.masked_fill(~keep, float("-inf")))
    return x.log_softmax(dim=1)


def _sample_sorted(table, batch, logits):
    """The engine's pre-fusion sampling step with top-k / top-p (stands in for sampler._sample)."""
    step = table.num_gen[batch.seq_ids]  # [R]
    u = uniforms_at(batch.keys, step).to(logits.device)
    if batch.min_new is not None:
        logits = mask_stop_tokens(logits, batch.device_stop_ids, (step < batch.min_new).to(logits.device))
    logp = _process_sorted(logits, batch.temperature, batch.top_k, batch.top_p)
    return sample_from_logp(logp, batch.greedy, u)


def generate_sorted(*args, **kwargs):
    """`generate` with the pre-fusion sampling step."""
    fused, sampler_mod._sample = sampler_mod._sample, _sample_sorted
    try:
        return generate(*args, **kwargs)
    finally:
        sampler_mod._sample = fused


def preset_rows(repeats: int) -> tuple[list, dict]:
    """Rows and JSON fields of the presets' sampling settings (module docstring), interleaved in one measure()."""
    hf, model = build("tiny1k", Path(tempfile.mkdtemp()))
    batch, vocab = 256, MODELS["tiny1k"]["vocab_size"]
    prompts = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch)).tolist()
    plain = SamplingParams(temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS, stop_token_ids=[], seed=0)
    topk = SamplingParams(temperature=TEMPERATURE, top_k=PRESET_TOP_K, max_new_tokens=NEW_TOKENS, stop_token_ids=[],
                          seed=0)
    runs = {"dash no top-k": lambda: generate(model, None, prompts, params=plain),
            "dash top-k 50 (fused)": lambda: generate(model, None, prompts, params=topk),
            "dash top-k 50 (sort, before)": lambda: generate_sorted(model, None, prompts, params=topk),
            "hf generate no top-k": lambda: hf_generate(hf, prompts),
            "hf generate top-k 50": lambda: hf_generate(hf, prompts, top_k=PRESET_TOP_K)}
    rows, tok_s = [], {}
    for provider, res in measure(runs, repeats).items():
        if isinstance(res, Exception):
            rows.append(("tiny1k", batch, provider, None, None, f"{type(res).__name__}: {str(res)[:60]}"))
            continue
        tok_s[provider] = batch * NEW_TOKENS / res[0]
        rows.append(("tiny1k", batch, provider, tok_s[provider], res[1], ""))
        print(f"  tiny1k B={batch:<4d} {provider:28s} {tok_s[provider]:10.0f} tok/s", file=sys.stderr)
    keys = {"dash no top-k": "nofilter", "dash top-k 50 (fused)": "topk50", "dash top-k 50 (sort, before)":
            "topk50_sort", "hf generate no top-k": "hf_nofilter", "hf generate top-k 50": "hf_topk50"}
    fields = {f"presets_tok_s_{keys[p]}": round(v, 1) for p, v in tok_s.items()}
    if len(tok_s) == len(runs):
        fields.update(presets_topk50_over_nofilter=round(tok_s["dash top-k 50 (fused)"] / tok_s["dash no top-k"], 3),
                      presets_fused_over_sort=round(tok_s["dash top-k 50 (fused)"]
                                                    / tok_s["dash top-k 50 (sort, before)"], 2),
                      presets_topk50_vs_hf=round(tok_s["dash top-k 50 (fused)"] / tok_s["hf generate top-k 50"], 2))
    return rows, fields


def hf_generate_batch(hf, prompts):
    config = transformers.GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                           max_new_tokens=NEW_TOKENS, eos_token_id=-1, pad_token_id=0)
    with torch.no_grad():
        hf.generate_batch(prompts, generation_config=config, progress_bar=False)


def sched_overhead_ms(model) -> float:
    """Host-side scheduling per decode step with SCHED_SEQS live sequences (no forward, no sampling)."""
    n = 4
    prompts = torch.randint(3, model.config.vocab_size, (SCHED_SEQS // n, PROMPT_LEN)).tolist()
    params = [SamplingParams(max_new_tokens=SCHED_STEPS + 2, stop_token_ids=[2], seed=i) for i in range(len(prompts))]
    table = SequenceTable(prompts, params, n, model.config.max_position_embeddings, [2])
    cache = KVCache(model, SCHED_SEQS * 4, 16)
    sched = Scheduler(table, cache, max_num_seqs=SCHED_SEQS, max_batched_tokens=SCHED_SEQS * PROMPT_LEN)
    _, ids, _ = sched.schedule()  # the prefill step admits all 256 groups
    sched.postprocess(ids, torch.full((ids.numel(),), 7), torch.zeros(ids.numel()))
    assert len(sched.running) == SCHED_SEQS
    times = []
    for _ in range(SCHED_STEPS):
        t0 = time.perf_counter()
        _, ids, _ = sched.schedule()
        sched.postprocess(ids, torch.full((ids.numel(),), 7), torch.zeros(ids.numel()))  # fake sampled tokens
        times.append(time.perf_counter() - t0)
    assert len(sched.running) == SCHED_SEQS
    return statistics.median(times) * 1e3


# --gpu: the Qwen2.5-0.5B-shaped run of `make gpu-check` (see the module docstring).
GPU_PRESET = ROOT / "configs/qwen2.5-0.5b-math.yaml"  # its sampling section: temperature, top_k, top_p, page_size
GPU_SHAPE = {"batches": (8, 256), "prompt": 256, "new": 512, "model": "qwen2.5-0.5b", "dtype": torch.bfloat16}
DRY_SHAPE = {"batches": (2, 4), "prompt": 16, "new": 8, "model": "tiny", "dtype": torch.float32}


def _timed(fn, device: str) -> float:
    """Seconds of one call, the device drained before and after (CUDA kernels run asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def gpu_main(args) -> None:
    """dash.engine.generate vs HF generate on one device, same random weights, prompts and preset sampling."""
    import yaml

    from random_qwen import write_model

    shape, device = (DRY_SHAPE, "cpu") if args.dry_run else (GPU_SHAPE, "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sampler.py --gpu: no CUDA device (use --dry-run on CPU)")
    preset = yaml.safe_load(GPU_PRESET.read_text())["sampling"]
    new = args.new_tokens or shape["new"]
    hf_new_256 = min(args.hf_new_tokens_256 or new, new)
    folder = write_model(Path(tempfile.mkdtemp()) / "model", shape["model"], shape["dtype"])
    model = load_model(folder, shape["dtype"], device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=shape["dtype"]).to(device).eval()
    hf.generation_config.eos_token_id = None  # every row generates exactly its new tokens, as in the dash runs
    vocab = model.config.vocab_size
    rows, fields = [], {}
    for batch in shape["batches"]:
        prompts = torch.randint(3, vocab, (batch, shape["prompt"]), generator=torch.Generator().manual_seed(batch))
        ids = prompts.to(device)  # [B, prompt]
        hf_new = hf_new_256 if batch == 256 else new

        def dash_run(n):
            params = SamplingParams(temperature=preset["temperature"], top_k=preset["top_k"], top_p=preset["top_p"],
                                    max_new_tokens=n, stop_token_ids=[], seed=0)
            generate(model, None, prompts.tolist(), params=params, page_size=preset["page_size"])

        def hf_run(n):
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=n,
                            min_new_tokens=n, temperature=preset["temperature"], top_k=preset["top_k"],
                            top_p=preset["top_p"], pad_token_id=0)

        for provider, fn, n in (("dash", dash_run, new), ("hf generate", hf_run, hf_new)):
            try:
                fn(2)  # warm-up: kernel compilation and autotuning, allocator growth
                sec = min(_timed(lambda: fn(n), device) for _ in range(args.repeats))
            except Exception as err:  # noqa: BLE001 - one provider failing must not lose the other's row
                rows.append((batch, provider, n, None, f"{type(err).__name__}: {str(err)[:80]}"))
                continue
            rows.append((batch, provider, n, batch * n / sec, ""))
            fields[f"{'dash' if provider == 'dash' else 'hf'}_tok_s_{batch}"] = round(batch * n / sec, 1)
            print(f"  B={batch:<4d} {provider:12s} {n:4d} new {batch * n / sec:10.0f} tok/s", file=sys.stderr)
        if fields.get(f"hf_tok_s_{batch}") and fields.get(f"dash_tok_s_{batch}"):
            fields[f"sampler_vs_hf_{batch}"] = round(fields[f"dash_tok_s_{batch}"] / fields[f"hf_tok_s_{batch}"], 2)
    settings = {k: preset[k] for k in ("temperature", "top_k", "top_p", "page_size")}
    record = result("sampler", device, mode="gpu", dry_run=args.dry_run, model=shape["model"],
                    dtype=str(shape["dtype"])[6:], prompt_len=shape["prompt"], new_tokens=new,
                    hf_new_tokens_256=hf_new_256, sampling=settings, repeats=args.repeats, **fields,
                    transformers=transformers.__version__)
    lines = [f"sampler vs HF generate, random {shape['model']} ({record['dtype']}), {device}, {shape['prompt']}-token "
             f"prompts, sampling {settings}, EOS ignored, best of {args.repeats}"
             + (" (CPU dry run: numbers mean nothing)" if args.dry_run else ""),
             "| batch | provider | new tokens | tok/s | note |", "|---|---|---|---|---|"]
    lines += [f"| {b} | {p} | {n} | {'' if t is None else f'{t:.0f}'} | {note} |" for b, p, n, t, note in rows]
    if hf_new_256 != new:
        lines.append(f"HF generate at batch 256 makes {hf_new_256} new tokens (not {new}) to fit the time budget: its "
                     f"tok/s is over a shorter context, which flatters it")
    emit("\n".join(lines), record, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--presets-only", action="store_true", help="only the presets' sampling rows (tiny1k)")
    ap.add_argument("--hf-cb", action="store_true", help="also HF generate_batch (on this CPU: ~10 tok/s, ~12 GiB)")
    ap.add_argument("--out", default="", help="also write <out>.md (table) and <out>.json (the JSON line)")
    ap.add_argument("--gpu", action="store_true", help="the random Qwen2.5-0.5B run on CUDA (module docstring)")
    ap.add_argument("--dry-run", action="store_true", help="with --gpu: the same code on CPU at a tiny shape")
    ap.add_argument("--new-tokens", type=int, default=0, help="with --gpu: new tokens per row (0: 512)")
    ap.add_argument("--hf-new-tokens-256", type=int, default=0, help="with --gpu: HF's new tokens at batch 256 "
                    "(0: as dash; fewer to fit a time budget)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gpu:
        return gpu_main(args)
    rows, fields = [], {}
    sp = SamplingParams(temperature=TEMPERATURE, max_new_tokens=NEW_TOKENS, stop_token_ids=[], seed=0)
    for name in [] if args.presets_only else ["tiny"] if args.quick else ["tiny", "wide"]:
        hf, model = build(name, Path(tempfile.mkdtemp()))
        vocab = MODELS[name]["vocab_size"]
        for batch in (8, 256):
            prompts = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
            prompts = prompts.tolist()
            groups = prompts[: batch // 4]
            runs = {
                "dash": lambda: generate(model, None, prompts, params=sp),
                "dash G=4 fork": lambda: generate(model, None, groups, n=4, params=sp),
                "dash G=4 no-fork": lambda: generate(model, None, groups, n=4, params=sp, group_fork=False,
                                                     prefix_caching=False),
                "hf generate": lambda: hf_generate(hf, prompts),
            }
            if args.hf_cb:
                runs["hf generate_batch"] = lambda: hf_generate_batch(hf, prompts)
            if name == "tiny" and batch == 256:
                system = torch.randint(3, vocab, (SYSTEM_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
                shared = [system + p for p in prompts]
                runs["dash shared-prefix"] = lambda: generate(model, None, shared, params=sp)
                runs["dash shared-prefix no-cache"] = lambda: generate(model, None, shared, params=sp,
                                                                       prefix_caching=False)
                runs["hf shared-prefix"] = lambda: hf_generate(hf, shared)
                # RL prompts differ in length: HF pads the batch (and masks every step), dash packs it.
                g = torch.Generator().manual_seed(2)
                lens = torch.randint(RAGGED_LEN[0], RAGGED_LEN[1] + 1, (batch,), generator=g).tolist()
                ragged = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
                runs["dash ragged"] = lambda: generate(model, None, ragged, params=sp)
                runs["hf ragged (left-padded)"] = lambda: hf_generate(hf, ragged)
            for provider, res in measure(runs, args.repeats).items():
                if isinstance(res, Exception):
                    rows.append((name, batch, provider, None, None, f"{type(res).__name__}: {str(res)[:60]}"))
                    continue
                sec, mib = res
                tok_s = batch * NEW_TOKENS / sec
                rows.append((name, batch, provider, tok_s, mib, ""))
                print(f"  {name:5s} B={batch:<4d} {provider:28s} {tok_s:10.0f} tok/s  peak +{mib:7.1f} MiB",
                      file=sys.stderr)
        if name == "tiny":
            fields["sched_overhead_ms_1024"] = round(sched_overhead_ms(model), 4)
    preset, preset_fields = preset_rows(args.repeats)
    rows += preset
    fields.update(preset_fields)
    by = {(m, b, p): t for m, b, p, t, _, _ in rows}
    for m in ("tiny", "wide"):
        sfx = "" if m == "tiny" else "_wide"
        for b in (8, 256):
            for key, prov in (("dash", "dash"), ("hf", "hf generate"), ("hf_cb", "hf generate_batch"),
                              ("dash_fork", "dash G=4 fork"), ("dash_nofork", "dash G=4 no-fork"),
                              ("dash_prefix", "dash shared-prefix"), ("dash_noprefix", "dash shared-prefix no-cache"),
                              ("hf_prefix", "hf shared-prefix"), ("dash_ragged", "dash ragged"),
                              ("hf_ragged", "hf ragged (left-padded)")):
                if by.get((m, b, prov)) is not None:
                    fields[f"{key}_tok_s_{b}{sfx}"] = round(by[(m, b, prov)], 1)
    for b in (8, 256):
        if by.get(("tiny", b, "hf generate")):
            fields[f"speedup_vs_hf_{b}"] = round(by[("tiny", b, "dash")] / by[("tiny", b, "hf generate")], 2)
        if by.get(("wide", b, "hf generate")):
            fields[f"speedup_vs_hf_{b}_wide"] = round(by[("wide", b, "dash")] / by[("wide", b, "hf generate")], 2)
    if by.get(("tiny", 256, "hf ragged (left-padded)")):
        fields["speedup_vs_hf_256_ragged"] = round(by[("tiny", 256, "dash ragged")]
                                                   / by[("tiny", 256, "hf ragged (left-padded)")], 2)
    if by.get(("tiny", 256, "hf shared-prefix")):
        fields["speedup_vs_hf_256_prefix"] = round(by[("tiny", 256, "dash shared-prefix")]
                                                   / by[("tiny", 256, "hf shared-prefix")], 2)
    record = result("sampler", "cpu", **fields, threads=args.threads, transformers=transformers.__version__)
    lines = [f"sampler benchmark, {record['timestamp']}, cpu, {args.threads} thread(s), 1-min load average "
             f"{record['load_avg_1m']} (shared box: best of {args.repeats} interleaved rounds), {PROMPT_LEN}-token "
             f"prompts, {NEW_TOKENS} new tokens, temperature {TEMPERATURE}\n",
             "| model | batch | provider | tok/s | peak MiB | note |", "|---|---|---|---|---|---|"]
    for m, b, p, t, mib, note in rows:
        lines.append(f"| {m} | {b} | {p} | {'' if t is None else f'{t:.0f}'} | "
                     f"{'' if mib is None else f'{mib:.1f}'} | {note} |")
    if "sched_overhead_ms_1024" in record:
        lines.append(f"\nhost scheduling per decode step, 1024 live sequences: {record['sched_overhead_ms_1024']} ms")
    emit("\n".join(lines), record, args.out)


if __name__ == "__main__":
    main()
