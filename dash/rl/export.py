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

A LoRA checkpoint (dash/lora.py) holds `adapter/` alone; its base is the run's `model.path` (or `base`):
- lora="merge" (`--merge-lora`, and the default: the folder transformers and vLLM load with no peft): the base is
  loaded in the adapters' dtype (the run's model.dtype), wrapped as the run's model.lora config says, the adapters
  read in, and each LoRALinear replaced by a plain nn.Linear of weight W + (alpha / r) B A (computed in fp32, then
  cast): the normal folder above, with no lora_ tensor;
- lora="adapters" (`--adapters-only`): peft's adapter_config.json (base_model_name_or_path: the base folder, absolute)
  + adapter_model.safetensors, and the tokenizer files; `peft.AutoPeftModelForCausalLM.from_pretrained(out)` loads it.
The adapters are checked against the base (names, shapes, finite values; rank and alpha against the run's config) on
the `meta` device before any base weight is read.

    dash export runs/tiny --out exports/tiny     # python: dash.rl.export.export_checkpoint("runs/tiny", "exports/tiny")
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
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig

from dash.config import ConfigError, LoRAConfig
from dash.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, load_adapter, lora_modules, merged_weight
from dash.lora import read_adapter_config
from dash.model import CausalLM
from dash.model_io import CONFIG_FILE, INDEX_FILE, load_model, load_tokenizer, read_config
from dash.model_io import _read_headers, _umask_permissions, _weight_files  # header-only reads, file modes
from dash.rl.checkpoint import ADAPTER_DIR, MODEL_DIR, SHARDED_DIR, CheckpointError, is_sharded_checkpoint
from dash.rl.checkpoint import load_checkpoint
from dash.rl.checkpoint import _fsync_tree, load_sharded
from dash.rl.safe_dcp import SafeFileSystemReader
from dash.runtime import resolve_model_path

__all__ = ["export_checkpoint", "load_checkpoint_model", "ExportError", "MAX_SHARD_BYTES"]

MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default max_shard_size "5GB" (decimal, as it parses it)
_DCP_MODEL_PREFIX = "model."  # checkpoint.save_sharded_checkpoint saves {"model": ..., "optimizer": ...}
_LORA_MARK = "lora_"  # peft's adapter tensor names (lora_A / lora_B), which dash/lora.py keeps
_LORA_FLAGS = {"merge": "--merge-lora", "adapters": "--adapters-only"}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as transformers'


class ExportError(ConfigError):
    """A source or destination `dash export` cannot use; the message names the path and what is wrong."""


@dataclass(frozen=True, slots=True)
class _Source:
    ckpt: Path  # the checkpoint folder chosen (of a run: `latest`, or the newest complete one)
    run_cfg: dict  # the run's config as saved in the trainer state ({} for checkpoints saved without one)
    folder: Path  # config.json + tokenizer files: ckpt/model, or the base model folder of a sharded or LoRA run
    names: list[str]  # the checkpoint's (a LoRA one: the base's) weight names, read from headers / DCP metadata only
    lora: Literal["merge", "adapters"] | None = None  # what to write of a LoRA checkpoint; None: not one
    lora_cfg: LoRAConfig | None = None  # the run's model.lora (None when its config is not saved: the adapter's own)


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                      max_shard_bytes: int = MAX_SHARD_BYTES, dtype: torch.dtype | None = None,
                      base: str | os.PathLike | None = None, lora: Literal["merge", "adapters"] | None = None) -> Path:
    """Writes the HF folder `out` from run or checkpoint `src`; returns `out`.

    Args:
        overwrite: replace an `out` that exists and is not empty (the old one is removed after the new is in place).
        max_shard_bytes: shard the safetensors weights above this many bytes per file.
        dtype: cast the weights (default: the dtype the checkpoint holds).
        base: for a sharded (FSDP) or LoRA checkpoint, the HF folder giving config.json and the tokenizer (and, for
            LoRA, the base weights) (default: the run's model.path).
        lora: for a LoRA checkpoint, "merge" (the default) or "adapters" (see the module docstring); an error for
            any other checkpoint.
    """
    src, out = Path(src), Path(out)
    if max_shard_bytes < 1:
        raise ExportError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if lora not in (None, "merge", "adapters"):
        raise ExportError(f"lora must be None, 'merge' or 'adapters', got {lora!r}")
    _check_out(src, out, overwrite)
    source = _resolve(src, base, lora)
    tokenizer = load_tokenizer(source.folder)  # a missing / unreadable tokenizer fails before the weights load
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))  # also the writability probe
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    try:
        _umask_permissions(tmp, directory=True)  # mkdtemp makes a private 0700 folder; a model is an ordinary one
        if source.lora == "adapters":
            _write_adapters(source, tokenizer, tmp, dtype)
        else:
            _write(_load(source, dtype), tokenizer, source.run_cfg, tmp, max_shard_bytes)
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


def load_checkpoint_model(src: str | os.PathLike, *, dtype: torch.dtype | None = None,
                          base: str | os.PathLike | None = None, before_weights=None) -> tuple[CausalLM, Path, Path]:
    """A run's or checkpoint's model on the CPU, as export reads it (for `dash eval`): -> (model in eval mode, the
    folder with its config.json and tokenizer, the checkpoint folder chosen). A LoRA checkpoint's adapters are
    applied, not merged: LoRALinear modules over the base, as the run trained and evaluated them.
    `before_weights(folder)`: called once the source is resolved and checked, before any weight is read."""
    source = _resolve(Path(src), base, None)
    if before_weights is not None:
        before_weights(source.folder)
    if source.lora is None:
        model = _load(source, dtype)
    else:
        stored = _ST_DTYPES[next(iter(_read_headers([source.ckpt / ADAPTER_DIR / ADAPTER_WEIGHTS]).values()))[2]]
        model = _attach(load_model(source.folder, dtype=dtype or stored), source)
    return model.eval(), source.folder, source.ckpt


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


def _resolve(src: Path, base: str | os.PathLike | None, lora: str | None) -> _Source:
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
    sharded, has_adapter = is_sharded_checkpoint(ckpt), (ckpt / ADAPTER_DIR).is_dir()
    if not sharded and not has_adapter:
        if base is not None:
            raise ExportError(f"base={base}: only a sharded (FSDP) or LoRA checkpoint needs it; {ckpt} holds its own "
                              f"{MODEL_DIR}/ folder")
        folder = ckpt / MODEL_DIR
        source = _Source(ckpt, run_cfg, folder, list(_read_headers(_weight_files(folder))))
    else:
        folder = _base_folder(ckpt, run_cfg, base, "a LoRA checkpoint (adapters alone)" if has_adapter else
                              "a sharded (FSDP) checkpoint")
        if has_adapter:
            names = list(_read_headers(_weight_files(folder)))
        else:
            names = [n.removeprefix(_DCP_MODEL_PREFIX) for n in
                     SafeFileSystemReader(ckpt / SHARDED_DIR).read_metadata().state_dict_metadata
                     if n.startswith(_DCP_MODEL_PREFIX)]
        source = _Source(ckpt, run_cfg, folder, names)
    return _check_lora(source, lora, has_adapter)


def _base_folder(ckpt: Path, run_cfg: dict, base: str | os.PathLike | None, kind: str) -> Path:
    """The base HF folder of a checkpoint that holds no config.json nor tokenizer: `base`, else the run's model.path."""
    path = base if base is not None else (run_cfg.get("model") or {}).get("path")
    if path is None:
        raise ExportError(f"{ckpt} is {kind}, which holds no config.json nor tokenizer, and its trainer state names "
                          "no model.path: pass --base FOLDER, the HF folder the run started from")
    try:
        return resolve_model_path(str(path))
    except ConfigError as exc:
        via = "--base" if base is not None else f"the run's model.path ({path!r}, recorded in {ckpt})"
        raise ExportError(f"{ckpt} is {kind}: its config.json and tokenizer come from {via}, but {exc}; "
                          "pass --base FOLDER, the HF folder the run started from") from None


def _check_lora(source: _Source, lora: str | None, has_adapter: bool) -> _Source:
    """`source` with its LoRA mode and config set; for a LoRA checkpoint, its adapters checked against the base on the
    meta device (names, shapes, finite values), before any base weight is read."""
    ckpt, flag = source.ckpt, _LORA_FLAGS.get(lora or "")
    run_lora = (source.run_cfg.get("model") or {}).get("lora") or {}  # config.LoRAConfig, as saved by the trainer
    if not has_adapter:
        if run_lora.get("enabled") is True or any(_LORA_MARK in n for n in source.names):
            raise ExportError(f"{ckpt}: its run trained LoRA adapters but it holds no {ADAPTER_DIR}/ folder (dash "
                              "writes a LoRA run's adapters there; FSDP LoRA runs are not supported)")
        if flag:
            raise ExportError(f"{flag}: no LoRA in this checkpoint ({ckpt}); export it without {flag}")
        return source
    adapter = ckpt / ADAPTER_DIR
    try:
        saved = read_adapter_config(adapter)
        cfg = LoRAConfig(**run_lora) if run_lora.get("enabled") is True else None
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        raise ExportError(f"{ckpt}: {exc}") from None
    if cfg is not None and (cfg.rank, cfg.alpha) != (saved.rank, saved.alpha):
        raise ExportError(f"{adapter / ADAPTER_CONFIG}: r={saved.rank}, lora_alpha={saved.alpha}, but the run's "
                          f"model.lora has rank={cfg.rank}, alpha={cfg.alpha} (recorded in {ckpt})")
    source = _Source(ckpt, source.run_cfg, source.folder, source.names, lora or "merge", cfg)
    with torch.device("meta"):  # shapes only: an adapter for another base model fails here, not after loading it
        model = CausalLM(read_config(source.folder))
    _attach(model, source)  # outside the context: the adapter's own tensors are read for real (finiteness)
    return source


def _attach(model: CausalLM, source: _Source) -> CausalLM:
    """`model` (the base) with the run's LoRA wrapping and the checkpoint's adapters read in."""
    try:
        if source.lora_cfg is not None:
            apply_lora(model, source.lora_cfg)
    except ValueError as exc:
        raise ExportError(f"{source.ckpt}: {exc} (the run's model.lora, for the base {source.folder})") from None
    try:
        load_adapter(model, source.ckpt / ADAPTER_DIR)  # its errors name the adapter file and tensor
    except (OSError, ValueError) as exc:
        raise ExportError(f"{exc} (base: {source.folder})") from None
    return model


def _load(source: _Source, dtype: torch.dtype | None) -> CausalLM:
    """The checkpoint's weights in one CPU model (in `dtype`, else the stored one), every weight finite."""
    if source.lora is not None:
        return _merged(source, dtype)
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


def _merged(source: _Source, dtype: torch.dtype | None) -> CausalLM:
    """The LoRA model as one plain CausalLM: every LoRALinear replaced by nn.Linear(W + scaling B A, bias)."""
    stored = _ST_DTYPES[next(iter(_read_headers([source.ckpt / ADAPTER_DIR / ADAPTER_WEIGHTS]).values()))[2]]
    model = _attach(load_model(source.folder, dtype=stored), source)  # the base as the run loaded it: model.dtype
    dtype = dtype or stored
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            adapter = (m.lora_A.weight.float(), m.lora_B.weight.float(), m.scaling)  # A [r, in], B [out, r]
            weight = merged_weight(m.weight.float(), adapter).to(dtype)  # [out, in]; fp32 sum, one rounding
            if not torch.isfinite(weight).all():
                raise ExportError(f"{source.ckpt / ADAPTER_DIR}: merging the adapters of {name} gives NaN or inf in "
                                  f"{dtype}; export with --dtype float32 or --adapters-only")
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight = nn.Parameter(weight, requires_grad=False)
            plain.bias = m.bias
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, plain)
    return model.to(dtype).eval()


def _write_adapters(source: _Source, tokenizer, folder: Path, dtype: torch.dtype | None) -> None:
    """peft's adapter folder (checked in _check_lora) naming the base folder, plus the tokenizer files."""
    adapter = source.ckpt / ADAPTER_DIR
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(source.folder.resolve())  # peft loads the base from it, from any cwd
    tensors = load_file(adapter / ADAPTER_WEIGHTS)  # small: r (in + out) values a targeted projection
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(str(folder))
    for f in folder.iterdir():
        _umask_permissions(f, directory=False)


def _write(model: CausalLM, tokenizer, run_cfg: dict, folder: Path, max_shard_bytes: int) -> None:
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
