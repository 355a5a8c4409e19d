"""Metrics to a JSONL file (always), TensorBoard and Weights & Biases (when asked), plus sample completions.

Rank 0 alone logs: the trainer builds a logger on rank 0 only, and W&B is also refused here on any other rank
(`RANK` set by torchrun), so a replica built by mistake cannot open a second run. W&B gets the finite scalars of
each record at its step, and the run's config; a resumed run opens a new W&B run (W&B drops steps at or below the
last it holds, and the resumed run logs the steps after its checkpoint again).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class MetricsLogger:
    """Appends one JSON object per logged step to `<out_dir>/metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False, purge_step: int | None = None, *,
                 wandb: bool = False, wandb_project: str = "dash", run_config: dict[str, Any] | None = None):
        """`purge_step`: a resumed run's first step; TensorBoard drops the events it holds from there on (the old
        run's, logged again now), as dash/rl/run_dir.py does for the JSONL files. `wandb`: also log to a W&B run
        in `wandb_project` (files under <out_dir>/wandb) with `run_config` as its config."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / METRICS_FILE, "a", buffering=1)
        self._samples = open(self.out_dir / SAMPLES_FILE, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency: only log.tensorboard needs it
            except ImportError as exc:
                raise ImportError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
            self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge_step)
        self._wandb = _start_wandb(self.out_dir, wandb_project, run_config) if wandb else None

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **clean}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self._wandb.log(scalars, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        for sample in samples:
            self._samples.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        self._file.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(out_dir: Path, project: str, run_config: dict[str, Any] | None):
    """A W&B run writing under `out_dir`, or None on a rank other than 0."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        import wandb  # optional dependency: only log.wandb=true needs it
    except ImportError as exc:
        raise ImportError("log.wandb=true needs the wandb package: pip install wandb") from exc
    return wandb.init(project=project, name=out_dir.resolve().name, dir=str(out_dir), config=run_config)
