"""Small run-time resolutions shared by the CLI, trainer and benchmarks: device, dtype, model folder, seeding."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from dash.config import ConfigError  # the errors below name a config key: the CLI prints them without a trace

BUILTIN_PREFIX = "builtin:"
ASSETS_DIR = Path(__file__).parent / "assets"  # shipped small checkpoints, e.g. assets/tiny-sft
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> Path:
    """`builtin:NAME` -> the shipped folder dash/assets/NAME; anything else is a local folder path."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        folder = ASSETS_DIR / name
        if not folder.is_dir():
            known = sorted(p.name for p in ASSETS_DIR.iterdir()) if ASSETS_DIR.is_dir() else []
            raise ConfigError(f"model.path: no built-in model {name!r} (built-ins: {known}); "
                                    f"`python -m dash.rl.warmstart` recreates tiny-sft")
        return folder
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.path: {folder} is not a folder (expected config.json + *.safetensors)")
    return folder


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise the named device (checked to exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r} but this torch sees no CUDA device; use cpu or auto")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
