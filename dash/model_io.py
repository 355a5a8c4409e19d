"""Load and save `dash.model.CausalLM` in the HF folder format: config.json + *.safetensors (+ tokenizer files).

- `load_model(folder)` validates everything it can from metadata alone (config fields, weight files, tensor names,
  shapes and dtypes from the safetensors headers) before allocating a single parameter, and reports the first problem
  as ONE FileNotFoundError / ValueError that names the file and the field or tensor.
- Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`) checkpoints are read. With tied
  embeddings an `lm_head.weight` in the checkpoint is ignored (HF ties it to the embedding too); old Llama
  checkpoints' `rotary_emb.inv_freq` buffers are ignored (recomputed from the config).
- `save_model` writes into a temporary folder next to the target and renames it into place, so a crash never leaves
  a half-written checkpoint under the target name.
- Every weight must be finite after the cast to the requested dtype: a NaN / inf tensor is an error naming it (such a
  model samples only `<pad>` and trains nothing, silently).
- `load_tokenizer` prefers `tokenizer.json` through `PreTrainedTokenizerFast`: transformers 5.x `AutoTokenizer` may
  rebuild a byte-level Qwen2 tokenizer from `model_type` and silently ignore a custom tokenizer.json.
  A file the tokenizers library cannot parse is a ValueError naming it. With a config.json in the same folder, every
  id the tokenizer can produce (its vocabulary, added and special tokens) must be below the model's `vocab_size`: a
  larger tokenizer would index past the embedding mid-run; a smaller one (Qwen pads its embedding) is fine.

transformers is imported lazily, only for tokenizers. Tests: `.venv/bin/python -m pytest tests/model -q`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dash.model import CausalLM, ModelConfig

__all__ = ["load_model", "save_model", "load_tokenizer", "read_config"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# Slow / sentencepiece tokenizer files AutoTokenizer can use when there is no tokenizer.json.
_LEGACY_TOKENIZER_FILES = ("tokenizer.model", "vocab.json")
# Buffers some old checkpoints saved; we recompute them from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_NAMES_SHOWN = 5  # keep error messages readable for 0.5B-scale checkpoints with hundreds of tensors


def read_config(folder: str | os.PathLike) -> ModelConfig:
    """Parse and validate `folder/config.json`."""
    folder = _existing_folder(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {CONFIG_FILE} not found in model folder {folder}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return ModelConfig.from_hf_dict(data, source=str(path))


def load_model(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """Build a CausalLM from an HF checkpoint folder; parameters in `dtype` on `device`, in eval mode."""
    config = read_config(folder)
    folder = Path(folder)
    headers = _read_headers(_weight_files(folder))  # name -> (file, shape, dtype)
    with torch.device("meta"):  # shapes without memory: the reference for validation, then the real model
        model = CausalLM(config)
    if config.tie_word_embeddings:
        headers.pop("lm_head.weight", None)
    _check_tensors(model, headers, folder / CONFIG_FILE)

    model = model.to(dtype).to_empty(device=device)
    params = model.state_dict()  # views of the real parameters: copy_ fills them in place
    by_file: dict[Path, list[str]] = {}
    for name, (path, _, _) in headers.items():
        if not name.endswith(_IGNORED_SUFFIXES):
            by_file.setdefault(path, []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():  # one shard open at a time bounds host memory
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in names:
                    params[name].copy_(f.get_tensor(name))
                    _check_finite(params[name], name, path, f)
    return model.eval()


def save_model(
    model: CausalLM, folder: str | os.PathLike, tokenizer: Any = None, *, overwrite: bool = False
) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer's files) atomically; returns the folder.

    An existing non-empty `folder` is replaced only with `overwrite=True` (old copy removed after the rename).
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise FileExistsError(f"{folder}: exists and is not empty (pass overwrite=True to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    _umask_permissions(tmp, directory=True)  # mkdtemp makes a private 0700 folder; the model is an ordinary one
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_hf_dict(dtype), indent=2) + "\n")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}  # no tied duplicate
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})  # HF checks the "format" key
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            _umask_permissions(f, directory=False)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """A transformers tokenizer for `folder`: tokenizer.json via PreTrainedTokenizerFast (vocab checked against
    the file), else AutoTokenizer for sentencepiece / vocab.json folders."""
    folder = _existing_folder(folder)
    path = folder / TOKENIZER_FILE
    if path.is_file():
        tokenizer = _read_tokenizer(PreTrainedTokenizerFast, folder)
        _check_vocab(tokenizer.get_vocab(), path)
    elif any((folder / name).is_file() for name in _LEGACY_TOKENIZER_FILES):
        tokenizer = _read_tokenizer(AutoTokenizer, folder)
    else:
        raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE} (nor {' / '.join(_LEGACY_TOKENIZER_FILES)}) in {folder}")
    _check_ids_fit_model(tokenizer, folder)
    return tokenizer


# ---------------------------------------------------------------- validation helpers


def _umask_permissions(path: Path, directory: bool) -> None:
    """chmod `path` to what a plain mkdir / open would have given under the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if directory else 0o666) & ~umask)


def _existing_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model folder not found")
    return path


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, model.safetensors, or every *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{index}: not valid JSON with a 'weight_map' field") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {INDEX_FILE} 'weight_map' not found")
        return files
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder / WEIGHTS_FILE}: no {WEIGHTS_FILE}, {INDEX_FILE} or *.safetensors in "
                                f"{folder} (.bin checkpoints are not read; convert them to safetensors)")
    return files


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, list[int], str]]:
    """name -> (file, shape, safetensors dtype), from the headers only (no tensor data is read)."""
    headers: dict[str, tuple[Path, list[int], str]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in headers:
                        raise ValueError(f"{path}: tensor '{name}' also in {headers[name][0].name}")
                    sl = f.get_slice(name)
                    headers[name] = (path, list(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    return headers


def _check_tensors(model: CausalLM, headers: dict[str, tuple[Path, list[int], str]], config_path: Path) -> None:
    """Every parameter present with the config's shape and a float dtype, and nothing else."""
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    files = sorted({p.name for p, _, _ in headers.values()}) or ["(no tensors)"]
    c = model.config
    dims = (f"{config_path} has model_type={c.model_type!r}, num_hidden_layers={c.num_hidden_layers}, "
            f"tie_word_embeddings={c.tie_word_embeddings}")
    missing = [n for n in expected if n not in headers]
    if missing:
        raise ValueError(f"{', '.join(files)}: missing tensor(s) {_some(missing)}; {dims}")
    extra = [n for n in headers if n not in expected and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise ValueError(f"{headers[extra[0]][0]}: unexpected tensor(s) {_some(extra)} not used by the model; {dims}")
    for name, shape in expected.items():
        path, actual, st_dtype = headers[name]
        if actual != shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {actual} but {config_path} implies {shape} "
                             f"(hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}, "
                             f"vocab_size={c.vocab_size}, heads={c.num_attention_heads}/{c.num_key_value_heads}, "
                             f"head_dim={c.head_dim})")
        if st_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has dtype {st_dtype}; only {sorted(_FLOAT_DTYPES)} are read "
                             "(quantised checkpoints are not supported)")


def _check_vocab(vocab: dict[str, int], path: Path) -> None:
    """The loaded tokenizer's vocab must be exactly tokenizer.json's model vocab + added tokens."""
    data = json.loads(path.read_text())
    model_vocab = data.get("model", {}).get("vocab")
    if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...], id = position
        expected = {piece: i for i, (piece, _) in enumerate(model_vocab)}
    else:
        expected = dict(model_vocab or {})
    expected.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    if vocab != expected:
        diff = sorted(set(vocab.items()) ^ set(expected.items()), key=str)
        raise ValueError(f"{path}: loaded tokenizer vocab differs from the file's 'model.vocab' + 'added_tokens' "
                         f"({len(vocab)} vs {len(expected)} entries; e.g. {diff[:_MAX_NAMES_SHOWN]})")


def _read_tokenizer(cls: Any, folder: Path) -> Any:
    """`cls.from_pretrained(folder)`; whatever the tokenizers library raises on a bad file (often a bare
    `Exception` with a serde message) becomes a ValueError naming the folder's tokenizer files."""
    try:
        return cls.from_pretrained(str(folder))
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 -- tokenizers raises plain Exception; any of them means "unreadable"
        files = sorted(p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges")))
        raise ValueError(f"{folder}: the tokenizer files {files} cannot be read ({type(err).__name__}: "
                         f"{str(err)[:300]})") from None


def _check_ids_fit_model(tokenizer: Any, folder: Path) -> None:
    """Every id the tokenizer can emit (vocabulary, added and special tokens) below config.json's vocab_size."""
    config = folder / CONFIG_FILE
    try:
        vocab_size = json.loads(config.read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return  # no (readable) model config next to it: read_config reports that when the model is loaded
    if not isinstance(vocab_size, int):
        return
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    ids = {*vocab.values(), *(i for i in tokenizer.all_special_ids if i is not None)}
    top = max(ids, default=-1)
    if top >= vocab_size or len(vocab) > vocab_size:
        name = next((t for t, i in vocab.items() if i == top), "?")
        raise ValueError(f"{folder}: the tokenizer has {len(vocab)} tokens (largest id {top}, {name!r}) but the "
                         f"model's embedding has vocab_size={vocab_size} ({config}): every token id must be below "
                         "vocab_size; use the tokenizer the model was trained with")


def _check_finite(param: torch.Tensor, name: str, path: Path, f: Any) -> None:
    """A NaN / inf weight (in the file, or from the cast to a narrower dtype) is an error naming the tensor."""
    bad = int((~torch.isfinite(param)).sum())
    if bad:
        in_file = bool((~torch.isfinite(f.get_tensor(name))).any())
        cause = "in the file" if in_file else f"after conversion to {param.dtype} (values beyond its range)"
        raise ValueError(f"{path}: tensor '{name}' has {bad} of {param.numel()} values NaN or inf {cause}; "
                         "such a model samples garbage and trains nothing")


def _some(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_MAX_NAMES_SHOWN])
    more = f" and {len(names) - _MAX_NAMES_SHOWN} more" if len(names) > _MAX_NAMES_SHOWN else ""
    return f"[{shown}{more}]"
