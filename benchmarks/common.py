"""What every benchmark script shares: the commit, the machine, and the one JSON line a run ends with.

Every script in benchmarks/ prints a human table, then exactly one JSON line as the last line of stdout, so a reader
(a smoke test, .ci/gpu_check.py, `tail -1`) reads every benchmark the same way. `result` builds that line's dict: the
benchmark's own fields between `bench` and the COMMON_KEYS below, the same keys and formats in every script (a CPU
model, not `x86_64`; UTC timestamps; the load average, because these numbers usually come from a shared machine and a
load above the core count stretches every timing).

    from common import emit, result
    emit(table, result("linear", "cpu", rows=rows), args.out)   # table, JSON line; <out>.md and <out>.json

The scripts import this as `common` (they run as `python benchmarks/x.py`, which puts benchmarks/ first on sys.path),
so no script may be named like an installed module (tests/benchmarks/test_script_names.py checks).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Keys every JSON line carries, in this order after the benchmark's own fields (`bench` comes first).
COMMON_KEYS = ("bench", "git_sha", "timestamp", "device", "gpu", "cpu", "cores", "torch", "load_avg_1m")
UNKNOWN = "unknown"  # git_sha outside a git checkout (an sdist, a copied folder)


def git_sha() -> str:
    """Short hash of HEAD, or "unknown" when there is no git or no repository."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or UNKNOWN
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux); elsewhere what `platform` knows (often just the arch)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def utc_timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def machine(device: str) -> dict:
    """Where the numbers come from: device ("cpu" / "cuda"), GPU name (None on CPU), CPU model, cores, torch, load."""
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": device, "gpu": gpu, "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def result(bench: str, device: str, **fields) -> dict:
    """The JSON line of benchmark `bench` (its script's name) run on `device`: its own fields, then COMMON_KEYS.

    A field named like a common key is an error: the common keys mean the same thing in every script.
    """
    clash = sorted(set(fields) & set(COMMON_KEYS))
    if clash:
        raise ValueError(f"result({bench!r}): fields {clash} are common keys, set by benchmarks/common.py")
    return {"bench": bench, **fields, "git_sha": git_sha(), "timestamp": utc_timestamp(), **machine(device)}


def emit(table: str, record: dict, out: str | Path | None = None, heading: str = "", fenced: bool = False) -> None:
    """Print `table`, then `record` as the one JSON line; with `out`, also write <out>.md and <out>.json.

    <out>.md is `heading`, the table (in a code fence when `fenced`: a fixed-width table, not markdown) and the JSON
    line; <out>.json is the line alone. Folders of `out` are created.
    """
    line = json.dumps(record)
    print(table)
    print(line, flush=True)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        body = f"```\n{table}\n```" if fenced else table
        (out.parent / f"{out.name}.md").write_text(f"{heading}{body}\n\n```json\n{line}\n```\n")
        (out.parent / f"{out.name}.json").write_text(line + "\n")
