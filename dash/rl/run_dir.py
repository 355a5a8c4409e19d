"""One training run per out_dir, claimed before step 1, so no run's work is overwritten, interleaved or lost.

`claim_run_dir` is called by Trainer.setup (rank 0) before any weights load, and settles at once what used to go wrong
late or silently:

- a second run into a folder that holds one (a checkpoint, or a metrics record of a training step) is refused unless
  it continues it (`--resume`) or replaces it (`--overwrite`, which first deletes the old run's checkpoints/,
  metrics.jsonl, samples.jsonl and tb/; other files, e.g. an `sft/` model, stay). Step-0 records (`dash eval` of a
  model before training) are not a run;
- two runs at once: the run holds an exclusive `flock` on `<out_dir>/.lock` until close(); a second one fails at once,
  naming the pid written in the lock file. The kernel drops the lock when the process dies (kill -9 included), so a
  stale lock file never blocks a later run. flock is per host: on a filesystem shared by several nodes it only
  guards against runs on the same node;
- a folder that cannot be written: a probe file is created and removed in out_dir and out_dir/checkpoints, so the
  error comes before step 1 rather than at the first save;
- a resumed run logs every step once: records of steps after the resumed checkpoint's (the old run went on past it
  before it stopped) are dropped from metrics.jsonl and samples.jsonl, by an atomic rewrite, before the steps are
  run and logged again. TensorBoard's copy is purged by its own `purge_step` (dash/rl/metrics.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from dash.config import ConfigError

LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
LOG_FILES = ("metrics.jsonl", "samples.jsonl")  # one JSON record per line, each with its "step"
RUN_FILES = (CHECKPOINTS_DIR, *LOG_FILES, "tb")  # what --overwrite deletes


class RunDirError(ConfigError):
    """log.out_dir cannot take this run (it holds another, another run holds it, it cannot be written); names it."""


class RunDir:
    """A claimed out_dir: the lock is held until release() (Trainer.close) or the process ends."""

    def __init__(self, out_dir: Path, lock) -> None:
        self.out_dir, self._lock = out_dir, lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the only descriptor drops the flock
            self._lock = None


def claim_run_dir(out_dir: str | Path, *, resume: Path | None = None, resume_step: int | None = None,
                  overwrite: bool = False) -> RunDir:
    """Locks `out_dir` for this run and checks it can take it; `resume` / `resume_step`: the checkpoint continued."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"log.out_dir: cannot create {out_dir} ({exc.strerror})") from exc
    lock = _lock(out_dir)
    try:
        inside = resume is not None and out_dir.resolve() in Path(resume).resolve().parents
        if overwrite and inside:
            raise RunDirError(f"--overwrite would delete the checkpoint --resume continues ({resume}): give only one "
                              "of the two")
        held = _run_evidence(out_dir)
        if held and not overwrite and not inside:
            how = (f"continue it with --resume {out_dir}" if resume is None
                   else f"--resume {resume} is not in it: give another --log.out_dir")
            raise RunDirError(f"log.out_dir {out_dir} already holds a run ({held}); {how}, or start over with "
                              f"--overwrite (deletes its {', '.join(RUN_FILES)})")
        if overwrite:
            _clear(out_dir)
        for folder in (out_dir, out_dir / CHECKPOINTS_DIR):
            _probe(folder)
        if resume_step is not None:
            for name in LOG_FILES:
                _drop_records_after(out_dir / name, resume_step)
    except BaseException:
        lock.close()
        raise
    return RunDir(out_dir, lock)


def _lock(out_dir: Path):
    path = out_dir / LOCK_FILE
    try:
        lock = open(path, "a+")  # noqa: SIM115 (held for the whole run, closed by RunDir.release)
    except OSError as exc:
        raise RunDirError(f"log.out_dir: cannot write in {out_dir} ({exc.strerror}); fix its permissions or choose "
                          "another --log.out_dir") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        by = f" (pid {holder})" if holder.isdigit() else ""
        raise RunDirError(f"log.out_dir {out_dir} is in use by another run{by}: wait for it to end, or choose "
                          "another --log.out_dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _run_evidence(out_dir: Path) -> str | None:
    """What shows `out_dir` holds a training run (a checkpoint, a logged training step), or None."""
    checkpoints = out_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir() and any(p.name == "latest" or p.name.startswith("step-") for p in checkpoints.iterdir()):
        return f"checkpoints in {checkpoints}"
    metrics = out_dir / LOG_FILES[0]
    if metrics.is_file():
        steps = [_step(line) for line in metrics.read_text(errors="replace").splitlines() if line.strip()]
        if any(step is None or step >= 1 for step in steps):  # an unreadable line: assume the worst
            return f"logged training steps in {metrics}"
    return None


def _step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _clear(out_dir: Path) -> None:
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _probe(folder: Path) -> None:
    try:
        folder.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise RunDirError(f"log.out_dir: cannot write in {folder} ({exc.strerror or exc}); checkpoints and metrics "
                          "would be lost: fix its permissions or choose another --log.out_dir") from exc


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrites `path` without the records of steps after `step` (atomically: temp file, fsync, rename)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines(keepends=True) if line.strip()]
    steps = [_step(line) for line in lines]
    keep = [line for line, s in zip(lines, steps) if s is not None and s <= step]
    if len(keep) == len(lines):
        return
    torn = sum(s is None for s in steps)
    if torn:  # e.g. the last line of a run killed mid-write
        warnings.warn(f"{path}: dropped {torn} unreadable line(s) while rewinding the log to step {step}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)  # mkstemp's file is private (0600); keep the log's own mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
