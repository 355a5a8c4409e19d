"""What a data path names: one jsonl/parquet file, a glob of shards, or a folder written by `datasets`' save_to_disk.

Purpose: every place that takes a data path (RL training and held-out data, SFT and eval files) resolves it here
once, before any work, so a bad path is one clear error naming the config key: a glob that matches nothing (with
the pattern), shards of mixed formats (with one file of each), a folder that is not a saved dataset (with what a
saved one holds), a DatasetDict without the asked split (with the splits it has). `dash.data.read_records` then
reads the rows of whatever this resolved.

    source = resolve_source("data/train-*.parquet", key="data.train_path")   # DataSource(kind="parquet", files=...)

Design limits: shards are read in sorted path order (as `datasets` concatenates `data_files`), and a glob's rows are
numbered 0, 1, ... across all shards. A saved folder is read through `datasets.load_from_disk` (memory-mapped
Arrow), so it needs the optional `datasets` package (extra `data`); files and globs do not. A forced format
(`fmt="parquet"`, from `data.task=parquet`) applies to files and shards; a saved folder says its own format.
No streaming or remote paths (hf://, s3://): copy the data locally first.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SAVED_DATASET_FILES = ("state.json", "dataset_info.json")  # what Dataset.save_to_disk writes beside its .arrow files
SAVED_DICT_FILE = "dataset_dict.json"  # what DatasetDict.save_to_disk writes: {"splits": [...]}, one folder each
PARQUET_SUFFIXES = (".parquet", ".pq")  # `auto` reads these as parquet, every other suffix as JSON lines
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class DataSource:
    """A resolved data path.

    Attributes:
        spec: the path or pattern as given.
        kind: "jsonl" or "parquet" (every file of `files` has it), or "saved" (a save_to_disk folder).
        files: the files to read, in order; for "saved", the one folder.
        split: for a saved DatasetDict, the split to read; None otherwise.
    """

    spec: str
    kind: Literal["jsonl", "parquet", "saved"]
    files: tuple[Path, ...]
    split: str | None = None

    @property
    def sharded(self) -> bool:
        """True for a glob: rows are then numbered across shards, not by line of one file."""
        return any(c in _GLOB_CHARS for c in self.spec)


def is_glob(path: str | Path) -> bool:
    return any(c in _GLOB_CHARS for c in str(path))


def file_format(path: str | Path, fmt: str = "auto") -> Literal["jsonl", "parquet"]:
    """The format a file is read in: `fmt` when forced, else by suffix (.parquet/.pq -> parquet, else jsonl)."""
    if fmt in ("jsonl", "parquet"):
        return fmt
    return "parquet" if Path(path).suffix.lower() in PARQUET_SUFFIXES else "jsonl"


def resolve_source(path: str | Path, *, fmt: str = "auto", split: str = "train", key: str = "path",
                   split_key: str = "split") -> DataSource:
    """Resolve a data path (file, glob, or save_to_disk folder); ValueError naming `key` (or `split_key`) if unusable.

    Args:
        path: a .jsonl/.parquet file, a glob such as `data/train-*.parquet`, or a save_to_disk folder.
        fmt: "auto" (by suffix), "jsonl" or "parquet" (forced, for files and shards).
        split: the split read from a saved DatasetDict (ignored for anything else).
        key, split_key: the config keys named in errors (e.g. "data.train_path", "data.split").
    """
    spec = str(path)
    if not spec.strip():
        raise ValueError(f"{key}: empty data path (a file, a glob of shards, or a save_to_disk folder)")
    if is_glob(spec):
        return _resolve_glob(spec, fmt, key)
    folder = Path(spec)
    if folder.is_dir():
        return _resolve_saved(folder, split, key, split_key)
    if not folder.is_file():
        raise ValueError(f"{key}: no such file {spec}")
    return DataSource(spec=spec, kind=file_format(folder, fmt), files=(folder,))


def _resolve_glob(pattern: str, fmt: str, key: str) -> DataSource:
    matches = sorted(glob.glob(pattern, recursive=True))
    files = tuple(Path(m) for m in matches if Path(m).is_file())
    if not files:
        folders = f" (only {len(matches)} folder(s))" if matches else ""
        raise ValueError(f"{key}: the pattern {pattern!r} matches no file{folders}")
    kinds: dict[str, Path] = {}
    for f in files:
        kinds.setdefault(file_format(f, fmt), f)
    if len(kinds) > 1:
        raise ValueError(f"{key}: the pattern {pattern!r} matches shards of mixed formats ({kinds['jsonl']} is read "
                         f"as JSON lines, {kinds['parquet']} as parquet); narrow the pattern to one format")
    return DataSource(spec=pattern, kind=next(iter(kinds)), files=files)


def _resolve_saved(folder: Path, split: str, key: str, split_key: str) -> DataSource:
    if (folder / SAVED_DICT_FILE).is_file():
        try:
            splits = json.loads((folder / SAVED_DICT_FILE).read_text())["splits"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{key}: {folder / SAVED_DICT_FILE} is not a DatasetDict index ({exc!r})") from None
        if split not in splits:
            raise ValueError(f"{split_key}={split!r}: the DatasetDict in {folder} has the splits {splits}")
        return DataSource(spec=str(folder), kind="saved", files=(folder,), split=split)
    if all((folder / name).is_file() for name in SAVED_DATASET_FILES):
        return DataSource(spec=str(folder), kind="saved", files=(folder,))
    raise ValueError(f"{key}: the folder {folder} is not a dataset written by datasets' save_to_disk (it has no "
                     f"{SAVED_DICT_FILE}, nor {' + '.join(SAVED_DATASET_FILES)}); for a folder of shards give a "
                     f"glob such as {folder}/*.parquet")


def saved_records(source: DataSource, key: str = "path") -> Iterator[tuple[int, Any]]:
    """(0-based row index, row dict) of a save_to_disk folder (`source.kind == "saved"`)."""
    try:
        import datasets  # optional dependency (extra `data`): only a saved folder needs it
    except ImportError as exc:
        raise ImportError(f"{key}: {source.spec} is a folder written by datasets' save_to_disk; reading it needs "
                          "the datasets package: pip install datasets") from exc
    loaded = datasets.load_from_disk(source.spec)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[source.split]
    for row, record in enumerate(loaded):
        yield row, record
