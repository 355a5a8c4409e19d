"""Reading a sharded (torch.distributed.checkpoint) checkpoint without running code from it.

DCP's stock reader unpickles the folder's `.metadata` file with `pickle.load`, and its default planner reads every
non-tensor value (the optimizer's param_groups: lr, betas, ...) with `torch.load(weights_only=False)`: either runs any
code a crafted file names, on `dash train --resume` of an FSDP run. Here:

- `.metadata` is unpickled by a restricted unpickler that resolves only an allow-list of DCP's own metadata classes
  and torch's dtype / Size / layout names (the "restricting globals" recipe of the pickle documentation); any other
  global, `os.system` included, raises before it can be called;
- non-tensor values are read with `torch.load(weights_only=True)` (plain containers and numbers, which is all the
  optimizer's param_groups hold);
- tensors were already read with `weights_only=True` by DCP itself.

    dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner())
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

# (module, name) pairs a DCP `.metadata` pickle written by dash's FSDP checkpoints refers to (found with pickletools
# on torch 2.13): DCP's own dataclasses and enum, torch's Size and dtype names, the function torch pickles a layout
# with (a lookup of torch's own layouts by name), and the checkpoint's path.
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
_TORCH_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
# StorageMeta.checkpoint_id: the folder it was saved to (pathlib's module is pathlib._local from Python 3.13)
_PATH_NAMES = {(module, "PosixPath") for module in ("pathlib", "pathlib._local")}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file names a Python object outside the allow-list: refused, nothing of it was called."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_CLASSES | _TORCH_NAMES | _PATH_NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):  # torch.float32 & co
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refusing to load {module}.{name} (not a checkpoint metadata class)")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is read by the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _RestrictedUnpickler(stream).load()
            except Exception as exc:
                raise UnsafeCheckpointError(f"{path}: not a readable checkpoint metadata file ({exc})") from exc
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor values with torch.load(weights_only=True).

    The stock load_bytes unpickles with weights_only=False; it gets a copy re-saved from what the weights-only
    reader accepted (plain numbers and containers), so what it unpickles was written here, not by the checkpoint.
    """

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)  # raises on any global outside torch's safe set
        copy = io.BytesIO()
        torch.save(loaded, copy)
        copy.seek(0)
        super().load_bytes(read_item, copy)
