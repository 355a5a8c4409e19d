"""`dash eval`: evaluate any HF model folder, training run or checkpoint on the eval section's test sets.

    dash eval --model.path=models/Qwen2.5-0.5B --config my_eval.yaml           # an HF folder (or builtin:NAME)
    dash eval runs/math --config my_eval.yaml --eval.select=math500           # a run's latest checkpoint
    dash eval runs/math/checkpoints/step-200 --eval.n=8 --eval.k=1,4,8 --out results/step200.json

Sources: with no SOURCE (nor --resume, its older spelling) the model is `model.path`; a SOURCE folder holding a
config.json is an HF folder; anything else is a run or checkpoint, resolved and read as `dash export` reads it
(dash/rl/export.py: a replica checkpoint's model/, FSDP shards gathered, a LoRA run's adapters applied over its base
model.path). The model is loaded in `model.dtype` on `model.device`. The data, reward and eval settings are this
command's config (--config / overrides), not the run's saved one: the same evaluation can be run on any model.

Output: a table on stdout and a JSON record (source, model folder, checkpoint, eval's effective sampling settings, each
set's source and size, every metric) written atomically to `--out`, by default `<log.out_dir>/eval_results.json`.
Every bad input (an unknown set name, n < k, a missing set file, answers longer than the model's context) is a
ConfigError before any weight is read.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from dash import model_io  # called through the module, as the trainer does, so a test's patch of it applies
from dash.config import DashConfig
from dash.rl.export import load_checkpoint_model
from dash.model_io import CONFIG_FILE
from dash.rl.eval_sets import check_eval_sets, eval_sampling, load_eval_sets
from dash.rl.evaluate import evaluate_sets, set_metrics
from dash.runtime import resolve_device, resolve_dtype, resolve_model_path, seed_everything

RESULTS_FILE = "eval_results.json"  # under log.out_dir when --out is not given
_TABLE_METRICS = ("len_mean", "len_median", "len_p90")


def load_eval_model(cfg: DashConfig, source: str | None):
    """-> (model in eval mode on model.device, tokenizer, {"model_folder", "checkpoint"}); eval's sets and context
    are checked before any weight is read."""
    check_eval_sets(cfg)  # files first: nothing is read before a missing one is named
    device, dtype = resolve_device(cfg.model.device), resolve_dtype(cfg.model.dtype)

    def check(folder: Path) -> None:
        check_eval_sets(cfg, model_io.read_config(folder).max_position_embeddings)
        model_io.load_tokenizer(folder)  # a missing tokenizer file fails before the weights load

    if source is None or (Path(source) / CONFIG_FILE).is_file():
        folder = resolve_model_path(source if source is not None else cfg.model.path)
        check(folder)
        model, ckpt = model_io.load_model(folder, dtype=dtype, device=device).eval(), None
    else:
        model, folder, ckpt = load_checkpoint_model(source, dtype=dtype, before_weights=check)
        model = model.to(device)
    info = {"model_folder": str(folder), "checkpoint": str(ckpt) if ckpt else None}
    return model, model_io.load_tokenizer(folder), info


def run_eval(cfg: DashConfig, source: str | None = None, out: str | os.PathLike | None = None) -> dict:
    """Evaluates `source` (see the module docstring) on the selected sets; -> the results record, also written as
    JSON to `out` (default `<log.out_dir>/eval_results.json`), whose path is the record's "results_file"."""
    seed_everything(cfg.train.seed)
    model, tokenizer, info = load_eval_model(cfg, source)
    sets = load_eval_sets(cfg, tokenizer, model)
    with torch.no_grad():
        metrics, shown = evaluate_sets(sets, cfg.eval, cfg.train.seed, samples_shown=cfg.log.samples_shown)
    sampling = eval_sampling(cfg)
    settings = {name: getattr(sampling, name) for name in ("temperature", "top_p", "top_k", "max_new_tokens")}
    settings.update(n=cfg.eval.n, k=cfg.eval.k, greedy=cfg.eval.greedy, seed=cfg.train.seed)
    path = Path(out) if out is not None else Path(cfg.log.out_dir) / RESULTS_FILE
    record = {"source": source if source is not None else cfg.model.path, **info, "settings": settings,
              "sets": {name: {"source": es.source, "reward": es.reward, "prompts": len(es.examples)}
                       for name, es in sets.items()},
              "metrics": metrics, "samples": shown, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "results_file": str(path)}
    _write_json(path, record)
    return record


def _write_json(path: Path, record: dict) -> None:
    """Atomic: a reader never sees half a file, an interrupted run leaves the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_table(record: dict) -> str:
    """The record's metrics as a text table, one row per set."""
    per_set = set_metrics(record["metrics"])
    ks = [f"pass@{k}" for k in sorted({1, *record["settings"]["k"]})]
    greedy = any("greedy_acc" in m for m in per_set.values())
    head = ["set", "prompts", *ks, *(["greedy"] if greedy else []), "len mean", "median", "p90", "truncated"]
    rows = [head]
    for name, m in per_set.items():
        rows.append([name, str(int(m["prompts"])), *(f"{m[k]:.3f}" for k in ks),
                     *([f"{m['greedy_acc']:.3f}"] if greedy else []), *(f"{m[k]:.1f}" for k in _TABLE_METRICS),
                     f"{m['truncated_frac']:.1%}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    s = record["settings"]
    lines.append(f"(n={s['n']}, temperature={s['temperature']:g}, top_p={s['top_p']:g}, top_k={s['top_k']}, "
                 f"max_new_tokens={s['max_new_tokens']}; lengths in tokens; {record['metrics']['time/eval_s']:.1f} s)")
    return "\n".join(lines)

