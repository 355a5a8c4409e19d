"""Atomic checkpoints with exact resume.

A checkpoint is a folder `<out_dir>/checkpoints/step-<N>/` holding `model/` (an HF folder: config.json,
model.safetensors, tokenizer files, loadable by `dash.model_io.load_model` or transformers) and `trainer_state.pt`
(optimizer, LR scheduler, RNG states, data position, step, config). It is written into a temporary sibling folder and
renamed into place, and `latest` (a one-line file naming the newest folder) is replaced atomically after that, so a
run killed at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from dash.model_io import save_model

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


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
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old folder
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """`path` may be a checkpoint folder, or a run / checkpoints folder whose `latest` names one."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            path = root / (root / LATEST).read_text().strip()
            break
    if not (path / STATE_FILE).is_file() or not (path / MODEL_DIR).is_dir():
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint (no {STATE_FILE} and {MODEL_DIR}/ in it)")
    return path


def load_trainer_state(ckpt: Path) -> dict:
    # weights_only=False: the state holds numpy RNG tuples and plain dicts written by this module.
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
