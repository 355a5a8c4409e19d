"""`dash export`: a training run or checkpoint -> an HF model folder that transformers and vLLM load as they are.

Why: a checkpoint is dash's own layout (trainer state beside `model/`, or DCP shards with no model folder at all under
FSDP); users hand the result to transformers / vLLM, which want one plain folder:

    config.json, model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json when the
    weights exceed `max_shard_bytes`), generation_config.json, the tokenizer files

Sources (`src`), resolved by checkpoint.load_checkpoint, so the rules are --resume's:
- a run folder: the checkpoint `latest` names, or past a damaged one the newest complete one (with a warning);
- a replica (single-process / DDP) checkpoint: its `model/` folder, validated by model_io.load_model;
- a sharded (FSDP) checkpoint: its DCP shards gathered into one CPU model, read only through safe_dcp's pickle-free
  reader (checkpoint.load_sharded). It holds no config.json nor tokenizer: both come from the run's `model.path`
  (recorded in the checkpoint's trainer state) or from `base`, and every shard's shape is checked against it first.

generation_config.json carries the bos / eos / pad ids as dash's sampler picks them (the tokenizer's, else the model
config's) and the run's sampling.temperature / top_p / top_k (temperature 0: greedy). Departure: max_new_tokens and
min_new_tokens are not written: they are the run's training budget, and a reader would cut every answer there.

Every bad input fails before any weight is read, naming the path: a `src` that is no run nor checkpoint, an `out`
that exists and is not empty (without overwrite), is the source or holds it, or cannot be created. The folder is
written into a temporary sibling, fsynced and renamed into place: an interrupted export leaves no `out` at all.
Design limits: the whole model is gathered in host memory once; weights keep the checkpoint's dtype unless `dtype`.
LoRA (dash/lora.py, in progress): a checkpoint with adapters is refused today; `lora="merge"` / `"adapters"` are the
hook (merged weights in this same folder, or peft's adapter_config.json + adapter_model.safetensors).

    dash export runs/tiny --out exports/tiny     # python: dash.export.export_checkpoint("runs/tiny", "exports/tiny")
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from dash.config import ConfigError
from dash.model import CausalLM
from dash.model_io import CONFIG_FILE, INDEX_FILE, load_model, load_tokenizer, read_config
from dash.model_io import _read_headers, _umask_permissions, _weight_files  # header-only reads, file modes
from dash.rl.checkpoint import MODEL_DIR, SHARDED_DIR, CheckpointError, is_sharded_checkpoint, load_checkpoint
from dash.rl.checkpoint import _fsync_tree, load_sharded
from dash.rl.safe_dcp import SafeFileSystemReader
from dash.runtime import resolve_model_path

__all__ = ["export_checkpoint", "ExportError", "MAX_SHARD_BYTES"]

MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default max_shard_size "5GB" (decimal, as it parses it)
_DCP_MODEL_PREFIX = "model."  # checkpoint.save_sharded_checkpoint saves {"model": ..., "optimizer": ...}
_LORA_MARK = "lora_"  # peft's adapter tensor names (lora_A / lora_B), which dash/lora.py keeps
_ADAPTER_CONFIG = "adapter_config.json"  # peft's adapter folder (dash.lora.ADAPTER_CONFIG)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as transformers'


class ExportError(ConfigError):
    """A source or destination `dash export` cannot use; the message names the path and what is wrong."""


@dataclass(frozen=True, slots=True)
class _Source:
    ckpt: Path  # the checkpoint folder chosen (of a run: `latest`, or the newest complete one)
    run_cfg: dict  # the run's config as saved in the trainer state ({} for checkpoints saved without one)
    folder: Path  # config.json + tokenizer files: ckpt/model, or the sharded run's base model folder
    names: list[str]  # the checkpoint's weight names, read from headers / DCP metadata only


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                      max_shard_bytes: int = MAX_SHARD_BYTES, dtype: torch.dtype | None = None,
                      base: str | os.PathLike | None = None, lora: Literal["merge", "adapters"] | None = None) -> Path:
    """Writes the HF folder `out` from run or checkpoint `src`; returns `out`.

    Args:
        overwrite: replace an `out` that exists and is not empty (the old one is removed after the new is in place).
        max_shard_bytes: shard the safetensors weights above this many bytes per file.
        dtype: cast the weights (default: the dtype the checkpoint holds).
        base: for a sharded (FSDP) checkpoint, the HF folder giving config.json and the tokenizer (default: the
            run's model.path).
        lora: "merge" or "adapters" for a LoRA run (not wired yet: see the module docstring).
    """
    src, out = Path(src), Path(out)
    if max_shard_bytes < 1:
        raise ExportError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if lora not in (None, "merge", "adapters"):
        raise ExportError(f"lora must be None, 'merge' or 'adapters', got {lora!r}")
    _check_out(src, out, overwrite)
    source = _resolve(src, base)
    _check_lora(source, lora)
    tokenizer = load_tokenizer(source.folder)  # a missing / unreadable tokenizer fails before the weights load
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))  # also the writability probe
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    try:
        _umask_permissions(tmp, directory=True)  # mkdtemp makes a private 0700 folder; a model is an ordinary one
        model = _load(source, dtype)
        _write(model, tokenizer, source.run_cfg, tmp, max_shard_bytes)
        _fsync_tree(tmp)  # on disk before the rename makes it reachable
        if out.exists():  # empty, or replaced with overwrite: moved aside, deleted once the new folder is in place
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parse_size(text: str) -> int:
    """`--max-shard-size`: "5GB", "200MB", "1000" (bytes) -> bytes; an ExportError naming the option otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text, re.IGNORECASE)
    size = int(float(m[1]) * _SIZE_UNITS[(m[2] or "").upper()]) if m else 0
    if size < 1:
        raise ExportError(f"--max-shard-size: {text!r} is not a size of at least 1 byte (e.g. 5GB, 200MB, 1000)")
    return size


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    resolved = out.resolve()
    if resolved == src.resolve() or resolved in src.resolve().parents:
        raise ExportError(f"--out {out}: is the source {src} or a folder holding it; replacing it would delete the "
                          "checkpoint being exported")


def _resolve(src: Path, base: str | os.PathLike | None) -> _Source:
    if not src.exists():
        raise ExportError(f"{src}: no such run or checkpoint folder")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt, state = load_checkpoint(src)
    except CheckpointError as exc:
        hint = (f"; {src} is an HF model folder already (transformers loads it as it is)"
                if (src / CONFIG_FILE).is_file() else "")
        raise ExportError(str(exc).removeprefix("--resume: ") + hint) from None
    for w in caught:  # the fallback past a damaged checkpoint, reworded for this command
        warnings.warn(str(w.message).replace("--resume: ", "export: ").replace("resuming from", "exporting"),
                      stacklevel=3)
    run_cfg = state.get("config") or {}
    if not is_sharded_checkpoint(ckpt):
        if base is not None:
            raise ExportError(f"base={base}: only a sharded (FSDP) checkpoint needs it; {ckpt} holds its own "
                              f"{MODEL_DIR}/ folder")
        folder = ckpt / MODEL_DIR
        return _Source(ckpt, run_cfg, folder, list(_read_headers(_weight_files(folder))))
    path = base if base is not None else (run_cfg.get("model") or {}).get("path")
    if path is None:
        raise ExportError(f"{ckpt} is a sharded (FSDP) checkpoint, which holds no config.json nor tokenizer, and its "
                          "trainer state names no model.path: pass --base FOLDER, the HF folder the run started from")
    try:
        folder = resolve_model_path(str(path))
    except ConfigError as exc:
        via = "--base" if base is not None else f"the run's model.path ({path!r}, recorded in {ckpt})"
        raise ExportError(f"{ckpt} is sharded (FSDP): its config.json and tokenizer come from {via}, but {exc}; "
                          "pass --base FOLDER, the HF folder the run started from") from None
    names = list(SafeFileSystemReader(ckpt / SHARDED_DIR).read_metadata().state_dict_metadata)
    return _Source(ckpt, run_cfg, folder, [n.removeprefix(_DCP_MODEL_PREFIX) for n in names
                                           if n.startswith(_DCP_MODEL_PREFIX)])


def _check_lora(source: _Source, lora: str | None) -> None:
    lora_cfg = (source.run_cfg.get("model") or {}).get("lora") or {}  # config.LoRAConfig, as saved by the trainer
    found = (lora_cfg.get("enabled") is True or any(_LORA_MARK in n for n in source.names)
             or any(source.ckpt.rglob(_ADAPTER_CONFIG)))
    flag = {"merge": "--merge-lora", "adapters": "--adapters-only"}.get(lora or "")
    if found:
        raise ExportError(f"{source.ckpt} holds LoRA adapters; exporting a LoRA run (merged, or adapters only) is not "
                          "wired yet: export the base model folder, or a full fine-tuning run")
    if flag:
        raise ExportError(f"{flag}: no LoRA in this checkpoint ({source.ckpt}); export it without {flag}")


def _load(source: _Source, dtype: torch.dtype | None) -> CausalLM:
    """The checkpoint's weights in one CPU model (in `dtype`, else the stored one), every weight finite."""
    if not is_sharded_checkpoint(source.ckpt):
        headers = _read_headers(_weight_files(source.folder))
        stored = _ST_DTYPES[next(iter(headers.values()))[2]]  # load_model rejects non-float files itself
        return load_model(source.folder, dtype=dtype or stored)  # shapes, names and finiteness checked there
    with torch.device("meta"):  # shapes only: compared with the shards' before any memory is used
        model = CausalLM(read_config(source.folder))
    meta = SafeFileSystemReader(source.ckpt / SHARDED_DIR).read_metadata().state_dict_metadata
    want = {n: list(t.shape) for n, t in model.state_dict().items()}
    have = {n: list(meta[_DCP_MODEL_PREFIX + n].size) for n in source.names}
    if want != have:
        bad = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))[0]
        raise ExportError(f"{source.ckpt / SHARDED_DIR}: tensor '{bad}' is {have.get(bad, 'missing')} in the shards "
                          f"but {want.get(bad, 'not a parameter')} for {source.folder / CONFIG_FILE}: pass --base, "
                          "the HF folder this run started from")
    stored = meta[_DCP_MODEL_PREFIX + source.names[0]].properties.dtype
    model = model.to(stored).to_empty(device="cpu")
    load_sharded(source.ckpt, model)  # every parameter filled (the names matched above); pickle-free reader
    model = model.to(dtype or stored)
    for name, t in model.state_dict().items():
        if not torch.isfinite(t).all():
            raise ExportError(f"{source.ckpt / SHARDED_DIR}: tensor '{name}' has NaN or inf values (in {t.dtype})")
    return model.eval()


def _write(model: CausalLM, tokenizer, run_cfg: dict, folder: Path, max_shard_bytes: int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import GenerationConfig

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}  # tied: no lm_head duplicate
    dtype = next(iter(tensors.values())).dtype
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_hf_dict(dtype), indent=2) + "\n")
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(folder / filename), metadata={"format": "pt"})  # HF needs "pt"
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    ids = {}
    for name in ("bos", "eos", "pad"):  # as the sampler picks EOS: the tokenizer's id, else the model config's
        value = getattr(tokenizer, f"{name}_token_id", None)
        ids[f"{name}_token_id"] = value if value is not None else getattr(model.config, f"{name}_token_id")
    sampling = run_cfg.get("sampling") or {}
    temperature = sampling.get("temperature")
    if temperature == 0:
        ids["do_sample"] = False
    elif temperature is not None:  # dash's top_k 0 means "off", as in transformers and vLLM
        ids.update(do_sample=True, temperature=temperature, top_p=sampling.get("top_p", 1.0),
                   top_k=sampling.get("top_k", 0))
    GenerationConfig(**ids).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    for f in folder.iterdir():
        _umask_permissions(f, directory=False)
