"""Atomic checkpoints with exact resume.

A checkpoint is a folder `<out_dir>/checkpoints/step-<N>/` holding `model/` (an HF folder: config.json,
model.safetensors, tokenizer files, loadable by `dash.model_io.load_model` or transformers) and `trainer_state.pt`
(optimizer, LR scheduler, RNG states, data position, step, config). It is written into a temporary sibling folder and
renamed into place, and `latest` (a one-line file naming the newest folder) is replaced atomically after that, so a
run killed at any moment leaves either the previous checkpoint or the new one, never half of one.

Under FSDP (`train.parallel: fsdp`) a checkpoint is sharded: `sharded/` is a torch.distributed.checkpoint (DCP)
folder where every rank writes its own shards of the weights and AdamW state (one `.distcp` file per rank, plus
`.metadata`), so no rank ever holds the full optimizer state; `trainer_state.pt` then has no optimizer entry and there
is no `model/`. The same temporary-folder-and-rename protocol applies, with rank 0 creating and publishing the
folder (so on several nodes, out_dir must be a shared filesystem). DCP reshards on load, so such a checkpoint
resumes with any world size (one process included), and `load_sharded(ckpt, model)` fills a plain single-process
model from it (e.g. to export it with save_model).
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

from dash.model_io import save_model
from dash.rl.distributed import DistInfo, broadcast_object

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
SHARDED_DIR = "sharded"


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


def save_checkpoint(out_dir: str | Path, step: int, model, tokenizer, trainer_state: dict) -> Path:
    """Writes checkpoint `step-<step>` atomically and points `latest` at it; returns its folder."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=root))
    try:
        save_model(model, tmp / MODEL_DIR, tokenizer=tokenizer)
        _publish(tmp, final, trainer_state, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_sharded_checkpoint(out_dir: str | Path, step: int, model, optimizer, trainer_state: dict,
                            info: DistInfo) -> Path:
    """FSDP: every rank calls this. Each writes its shards (model + optimizer, DCP) into one temporary folder made by
    rank 0; rank 0 adds trainer_state.pt and publishes the folder as save_checkpoint does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    # The targets define what is read and how it is sharded here; the optimizer's is built by a zero-lr step when it
    # has no state yet, so every AdamW moment has a tensor to load into.
    state = {"model": sd.get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = sd.get_optimizer_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.load(state, checkpoint_id=Path(ckpt) / SHARDED_DIR)
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
    """Adds trainer_state.pt to the complete temporary folder, renames it into place, then repoints `latest`.

    Every intermediate state leaves a complete checkpoint where `latest` points: a re-saved step (a rerun of a
    finished run writes the step `latest` names) first moves the old folder aside, and deletes it only after the new
    one is in place and named. Left-over temporary folders of killed saves are removed once a save completes.
    """
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
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


def _is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and ((path / MODEL_DIR).is_dir() or (path / SHARDED_DIR).is_dir())


def find_checkpoint(path: str | Path) -> Path:
    """`path` may be a checkpoint folder, or a run / checkpoints folder whose `latest` names one. When `latest` is
    missing or names no complete checkpoint (a save killed between its renames), the highest complete `step-N`."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if not root.is_dir() or _is_complete(root):
            continue
        named = root / (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
        if named is not None and _is_complete(named):
            return named
        steps = sorted((p for p in (*root.glob("step-*"), *root.glob(".step-*-replaced"))
                        if _step_number(p) is not None and _is_complete(p)),
                       key=lambda p: (_step_number(p), not p.name.startswith(".")))
        if steps:
            if named is not None:
                warnings.warn(f"--resume: {named} is not a complete checkpoint; resuming from {steps[-1]}")
            return steps[-1]
    if not _is_complete(path):
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint (no {STATE_FILE} and {MODEL_DIR}/ or "
                                f"{SHARDED_DIR}/ in it) and holds no complete step-N checkpoint")
    return path


def load_trainer_state(ckpt: Path) -> dict:
    # weights_only=False: the state holds numpy RNG tuples and plain dicts written by this module.
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
