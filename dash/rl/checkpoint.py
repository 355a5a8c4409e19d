"""Atomic checkpoints with exact resume.

A checkpoint is a folder `<out_dir>/checkpoints/step-<N>/` holding `model/` (an HF folder: config.json,
model.safetensors, tokenizer files, loadable by `dash.model_io.load_model` or transformers) and the trainer state
(optimizer, LR scheduler, RNG states, data position, step, config) as `trainer_state.safetensors` (tensors) +
`trainer_state.json` (the rest): no file of a checkpoint is ever unpickled, so a crafted one cannot run code
(dash/rl/state_io.py; an older dash's `trainer_state.pt` pickle is refused with a message). It is written into a
temporary sibling folder, fsynced and renamed into place, and `latest` (a one-line file naming the newest folder) is
replaced atomically after that, so a run killed at any moment leaves either the previous checkpoint or the new one,
never half of one. A LoRA run (`model.lora.enabled`) writes `adapter/` (peft's adapter layout, dash/lora.py) in place
of `model/`: only the adapters change, and its base is the run's `model.path`. `load_checkpoint` reads the state of the one `latest` names and, when that is damaged (a missing,
truncated or corrupt file), falls back to the newest checkpoint that reads, with a warning naming the bad file.

Under FSDP (`train.parallel: fsdp`) a checkpoint is sharded: `sharded/` is a torch.distributed.checkpoint (DCP)
folder where every rank writes its own shards of the weights and AdamW state (one `.distcp` file per rank, plus
`.metadata`), so no rank ever holds the full optimizer state; the trainer state then has no optimizer entry and there
is no `model/`. The same temporary-folder-and-rename protocol applies, with rank 0 creating and publishing the
folder (so on several nodes, out_dir must be a shared filesystem). DCP reshards on load, so such a checkpoint
resumes with any world size (one process included), and `load_sharded(ckpt, model)` fills a plain single-process
model from it (e.g. to export it with save_model); it reads DCP's pickled metadata with an allow-list
(dash/rl/safe_dcp.py).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import state_dict as sd
from torch.distributed.checkpoint.state_dict import get_state_dict

from dash.config import ConfigError
from dash.lora import has_adapters, save_adapter
from dash.model_io import save_model
from dash.rl.distributed import DistInfo, broadcast_object
from dash.rl.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError
from dash.rl.state_io import JSON_FILE, TENSORS_FILE, StateFileError, load_state, save_state

LATEST = "latest"
STATE_FILES = (JSON_FILE, TENSORS_FILE)
LEGACY_STATE_FILE = "trainer_state.pt"  # an older dash's pickle: never loaded
MODEL_DIR = "model"
SHARDED_DIR = "sharded"
ADAPTER_DIR = "adapter"  # a LoRA run: its adapters in peft's layout (dash/lora.py) instead of model/; the base is
# the run's model.path, never copied


class CheckpointError(ConfigError):
    """--resume found no usable checkpoint where it looked; the message names the folder or file and what is wrong."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, step: int, model, tokenizer, trainer_state: dict,
                    base_model: str | None = None) -> Path:
    """Writes checkpoint `step-<step>` atomically and points `latest` at it; returns its folder. A model with LoRA
    adapters saves them alone, as ADAPTER_DIR (`base_model`: the base folder named in its adapter_config.json)."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=root))
    try:
        if has_adapters(model):
            save_adapter(model, tmp / ADAPTER_DIR, base_model_name_or_path=base_model)
        else:
            save_model(model, tmp / MODEL_DIR, tokenizer=tokenizer)
        _publish(tmp, final, trainer_state, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_sharded_checkpoint(out_dir: str | Path, step: int, model, optimizer, trainer_state: dict,
                            info: DistInfo) -> Path:
    """FSDP: every rank calls this. Each writes its shards (model + optimizer, DCP) into one temporary folder made by
    rank 0; rank 0 adds the trainer state and publishes the folder as save_checkpoint does."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = None
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".step-{step}-", dir=root)
    tmp = Path(broadcast_object(tmp, info))
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)  # DTensor shards, keyed by parameter name
        # dcp.save returns on every rank only after the coordinator (rank 0) has written .metadata, i.e. after every
        # rank's shard file is complete, so rank 0 may publish right after it.
        with _single_process_ok():
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / SHARDED_DIR)
        if info.is_main:
            _publish(tmp, final, trainer_state, step)
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_sharded(ckpt: Path, model, optimizer=None) -> None:
    """Loads a sharded checkpoint's weights (and optimizer state) into `model` (FSDP-sharded or plain) in place."""
    # The targets define what is read and how it is sharded here; the optimizer's is built by a zero-lr step when it
    # has no state yet, so every AdamW moment has a tensor to load into.
    state = {"model": sd.get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = sd.get_optimizer_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.load(state, storage_reader=SafeFileSystemReader(Path(ckpt) / SHARDED_DIR), planner=SafeLoadPlanner())
    sd.set_model_state_dict(model, state["model"])
    if optimizer is not None:
        sd.set_optimizer_state_dict(model, optimizer, state["optimizer"])


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDED_DIR).is_dir()


@contextmanager
def _single_process_ok():
    """Silences DCP's warning that, with no process group, it assumes a single process: here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _publish(tmp: Path, final: Path, trainer_state: dict, step: int) -> None:
    """Adds the trainer state files to the complete temporary folder, renames it into place, then repoints `latest`.

    Every intermediate state leaves a complete checkpoint where `latest` points: a re-saved step (a rerun of a
    finished run writes the step `latest` names) first moves the old folder aside, and deletes it only after the new
    one is in place and named. Left-over temporary folders of killed saves are removed once a save completes.
    """
    save_state(tmp, {**trainer_state, "step": step, "rng": rng_state()})
    _fsync_tree(tmp)  # on disk before any rename can make it reachable (a power loss, not only a killed process)
    if final.exists():
        old = final.parent / f".{final.name}-replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # `latest` may name `final`: find_checkpoint falls back to the newest complete one
    os.replace(tmp, final)
    pointer_tmp = final.parent / f".{LATEST}.tmp"
    with open(pointer_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, final.parent / LATEST)
    _fsync_dir(final.parent)  # the renames themselves
    for stale in final.parent.glob(".step-*"):  # `old`, and the temporary folders of saves killed midway
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_dir():
            _fsync_dir(path)
        else:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_number(path: Path) -> int | None:
    """N of a `step-N` folder, or of `.step-N-replaced` (a re-saved step's previous folder, kept until the new one is
    published); None for anything else."""
    name = path.name.removeprefix(".").removesuffix("-replaced")
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def _problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, naming the file (None: every file is there; not yet read)."""
    if not path.is_dir():
        return f"{path} does not exist"
    if (path / LEGACY_STATE_FILE).is_file() and not (path / JSON_FILE).is_file():
        return (f"{path / LEGACY_STATE_FILE} was written by an older dash as a pickle, which is no longer loaded "
                f"because unpickling a file can run code; its {MODEL_DIR}/ folder still loads as --model.path")
    for name in STATE_FILES:
        if not (path / name).is_file():
            return f"{path / name} is missing"
    if not any((path / name).is_dir() for name in (MODEL_DIR, SHARDED_DIR, ADAPTER_DIR)):
        return f"{path} holds none of {MODEL_DIR}/, {SHARDED_DIR}/, {ADAPTER_DIR}/"
    return None


def _read(path: Path) -> tuple[dict | None, str | None]:
    """(trainer state, None) when `path` is a checkpoint whose files all read, else (None, what is wrong)."""
    problem = _problem(path)
    if problem:
        return None, problem
    try:
        state = load_state(path)
        if not isinstance(state.get("step"), int) or "rng" not in state:
            raise StateFileError(f"{path / JSON_FILE}: no step number or RNG state in it")
        if is_sharded_checkpoint(path):
            SafeFileSystemReader(path / SHARDED_DIR).read_metadata()
        for weights in sorted([*(path / MODEL_DIR).glob("*.safetensors"), *(path / ADAPTER_DIR).glob("*.safetensors")]):
            try:
                with safe_open(str(weights), "pt"):  # checks the header and that every listed byte is there
                    pass
            except (OSError, SafetensorError) as exc:
                raise StateFileError(f"{weights}: unreadable ({exc})") from exc
    except (StateFileError, UnsafeCheckpointError, OSError) as exc:
        return None, str(exc)
    return state, None


def _candidates(root: Path) -> list[Path]:
    """The folder `latest` names, then every step-N (and set-aside .step-N-replaced) folder, newest first."""
    name = Path((root / LATEST).read_text(errors="replace").strip()).name if (root / LATEST).is_file() else ""
    named = [root / name] if name else []  # a bare folder name: `latest` cannot point outside `root`
    steps = sorted((p for p in (*root.glob("step-*"), *root.glob(".step-*-replaced")) if _step_number(p) is not None),
                   key=lambda p: (_step_number(p), not p.name.startswith(".")), reverse=True)
    return named + [p for p in steps if p not in named]


def load_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """The checkpoint `--resume path` continues from, and its trainer state (tensors on the CPU).

    `path` may be a checkpoint folder (used as given: CheckpointError if it does not read), or a run / checkpoints
    folder: the checkpoint `latest` names, or when that one is missing or damaged (a save killed between its renames,
    a truncated or corrupt file) the newest complete one, with a warning naming what was skipped and why.
    """
    path = Path(path)
    if any((path / name).exists() for name in (*STATE_FILES, LEGACY_STATE_FILE, MODEL_DIR, SHARDED_DIR, ADAPTER_DIR)):
        state, problem = _read(path)
        if problem:
            raise CheckpointError(f"--resume: {problem}")
        return path, state
    for root in (path, path / "checkpoints"):
        candidates = _candidates(root) if root.is_dir() else []
        skipped = []
        for ckpt in candidates:
            state, problem = _read(ckpt)
            if problem is None:
                if skipped:
                    warnings.warn(f"--resume: {'; '.join(skipped)}: not a complete checkpoint; resuming from {ckpt}")
                return ckpt, state
            skipped.append(problem)
        if candidates:
            raise CheckpointError(f"--resume: {root} holds no complete step-N checkpoint ({'; '.join(skipped)})")
    raise CheckpointError(f"--resume: {path} is not a checkpoint (no {JSON_FILE} and {MODEL_DIR}/ or {SHARDED_DIR}/ "
                          f"in it) and holds no complete step-N checkpoint")
