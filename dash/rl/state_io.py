"""Trainer state on disk without pickle: tensors in a safetensors file, everything else in JSON.

A checkpoint's trainer state (optimizer, LR scheduler, RNG states, data position, step, config) used to be one
`torch.load(weights_only=False)` pickle, and unpickling runs whatever code the file names: a crafted checkpoint ran
commands on `dash train --resume`. Neither format here can run code when read: safetensors holds only a JSON header
and raw tensor bytes, JSON only data. Loading checks every reference and raises StateFileError naming the file.

    save_state(folder, state)  ->  folder/trainer_state.safetensors + folder/trainer_state.json
    load_state(folder)         ->  the same nested dict, tensors bitwise equal, on the CPU

The state is a tree of dicts, lists and tuples whose leaves are tensors, None, bool, int, float, str, numpy arrays
(numpy's RNG key) or numpy scalars. In the JSON copy each tensor is a reference into the safetensors file, and the
Python types JSON lacks are tagged: a tuple (Python's RNG state must come back as one), a dict with non-string keys
(the optimizer's per-parameter state is keyed by int) and a numpy array. Floats are written with repr, which reads
back to the same double, NaN and inf included, so a resume continues bitwise. The two files are written into the
checkpoint's temporary folder, which checkpoint.py fsyncs and renames into place: never half of either is reachable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS_FILE = "trainer_state.safetensors"
JSON_FILE = "trainer_state.json"
FORMAT = "dash-trainer-state"
VERSION = 1
# Tags of the JSON values that stand for something JSON has no type for; a real dict that uses one of these keys is
# itself written as an item list, so a tag can never be mistaken for data.
_TENSOR, _TUPLE, _ITEMS, _NDARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS, _NDARRAY)
_NDARRAY_KINDS = "biuf"  # bool, int, uint, float: what numpy's RNG state (a uint32 key) and the like need


class StateFileError(ValueError):
    """A trainer-state file that is missing, truncated, corrupt or not written by this module; names the file."""


def save_state(folder: Path, state: dict) -> None:
    """Writes `state` as TENSORS_FILE + JSON_FILE in `folder` (a checkpoint's temporary folder)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    tree = _encode(state, "", tensors, storages)
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format": FORMAT})
    text = json.dumps({"format": FORMAT, "version": VERSION, "state": tree}, indent=1)
    (folder / JSON_FILE).write_text(text + "\n")


def load_state(folder: Path) -> dict:
    """Reads what save_state wrote; StateFileError naming the file if either is missing, truncated or corrupt."""
    json_path, tensors_path = folder / JSON_FILE, folder / TENSORS_FILE
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{json_path}: unreadable ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise StateFileError(f"{json_path}: not a {FORMAT} file of version {VERSION}")
    try:
        tensors = load_file(str(tensors_path))  # checks the header and that the file holds every byte it lists
    except (OSError, SafetensorError) as exc:
        raise StateFileError(f"{tensors_path}: unreadable ({exc})") from exc
    try:
        state = _decode(doc["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"{json_path}: malformed state ({exc!r})") from exc
    if not isinstance(state, dict):
        raise StateFileError(f"{json_path}: the state is not a mapping")
    return state


def _encode(value: Any, path: str, tensors: dict, storages: set) -> Any:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer and pointer in storages:  # safetensors refuses two names for one storage (0: an empty one)
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        name = path or "."
        while name in tensors:  # e.g. keys 0 and "0" of one dict
            name += "'"
        tensors[name] = tensor
        return {_TENSOR: name}
    if isinstance(value, np.ndarray):
        return {_NDARRAY: value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, (np.bool_, np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors, storages) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors, storages) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, f"{path}/key", tensors, storages), _encode(v, f"{path}/{k}", tensors, storages)]
                         for k, v in value.items()]}
    raise TypeError(f"trainer state{path or ' root'}: a {type(value).__name__} cannot be stored without pickle "
                    "(use tensors, numbers, strings, lists, tuples and dicts)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        name = value[_TENSOR]
        if name not in tensors:
            raise KeyError(f"tensor {name!r} is not in {TENSORS_FILE}")
        return tensors[name]
    if _TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value[_ITEMS]}
    if _NDARRAY in value:
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in _NDARRAY_KINDS:
            raise ValueError(f"array dtype {dtype} is not a number type")
        return np.array(value[_NDARRAY], dtype=dtype)
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (dict, list, torch.Tensor, np.ndarray)):
        raise TypeError(f"a {type(key).__name__} cannot be a dict key")
    return key
