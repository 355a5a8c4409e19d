"""Metrics to a JSONL file (always) and TensorBoard (when asked), plus sample completions; rank-0 only callers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class MetricsLogger:
    """Appends one JSON object per logged step to `<out_dir>/metrics.jsonl`; mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False, purge_step: int | None = None):
        """`purge_step`: a resumed run's first step; TensorBoard drops the events it holds from there on (the old
        run's, logged again now), as dash/rl/run_dir.py does for the JSONL files."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / METRICS_FILE, "a", buffering=1)
        self._samples = open(self.out_dir / SAMPLES_FILE, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("log.tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
            self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **clean}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        for sample in samples:
            self._samples.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        self._file.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
