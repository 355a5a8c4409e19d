"""`make gpu-check`: on a bare GPU machine, install the project from this working tree with no download, build _C
with the CUDA kernels for the GPU at hand, run the `cuda` tests (tests/gpu/) and short GPU benchmarks, then print
one summary table and one JSON line, all within a wall-time budget (default 8 minutes).

    bash .ci/gpu_check.sh                       # what `make gpu-check` runs; writes its files to $OUT when set
    bash .ci/gpu_check.sh --install wheel       # build a wheel (into a temp folder) instead of installing: dry run
    bash .ci/gpu_check.sh --install skip        # the project is installed already

Target machine: one H100, torch 2.11+cu130, triton 3.6, nvcc 13, 16 cores, no network, no flash-attn. Steps:
  wheels   pip installs wheels/*.whl (pure-Python packages the image lacks, fetched here by `make gpu-wheels`)
  deps     every runtime dependency in pyproject.toml imports (names the missing ones and the fix)
  install  pip install -e . --no-build-isolation --no-deps --no-index, TORCH_CUDA_ARCH_LIST = the GPU's capability
  ext      dash_kernels._C loads, and on a GPU has the CUDA kernels of store_kv / copy_pages
  tests    pytest -m cuda tests/gpu (on a machine without CUDA every test is skipped with the reason)
  bench_*  benchmarks/fused_loss_gpu.py (N=16384, H=896, V=151936 bf16: fused vs naive, torch linear_cross_entropy,
           Liger), benchmarks/paged_decode.py (decode attention ms per call, batch 256, 1k-token contexts,
           Qwen2.5-0.5B heads), benchmarks/fused_loss.py and benchmarks/step_time.py with small settings, when a GPU
           is present and time is left
Exit status 0 when nothing failed (skips are not failures: a CPU dry run passes with every GPU step skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the 8 minutes, everything included
INSTALL_CAP_S = 300  # building _C with CUDA on 16 cores takes about two minutes
BENCH_RESERVE_S = 100  # left for the benchmarks when the tests start; they are dropped if less remains
MIN_STEP_S = 30  # a step with less time than this left is skipped, not started
FUSED_LOSS_KEYS = ("fused_fwd_peak_frac", "fused_bwd_over_fwd", "fused_mem_frac_naive", "fused_vs_liger")


class Check:
    """Runs the steps under one deadline and collects one row per step."""

    def __init__(self, budget_s: float, out: Path | None):
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.out = out
        self.rows: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, step: str, status: str, seconds: float = 0.0, detail: str = "", **extra) -> dict:
        r = dict(step=step, status=status, seconds=round(seconds, 1), detail=detail, **extra)
        self.rows.append(r)
        print(f"[gpu-check] {step}: {status} ({r['seconds']} s) {detail}", flush=True)
        return r

    def run(self, step: str, cmd: list[str], cap_s: float, log: str, env: dict | None = None):
        """Runs cmd with a timeout of min(cap_s, time left); its output goes to stdout and to $OUT/<log>."""
        timeout = min(cap_s, self.left())
        if timeout < MIN_STEP_S:
            return self.row(step, "skipped", detail=f"only {self.left():.0f} s of the budget left"), ""
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                  timeout=timeout, check=False)
            output = proc.stdout + proc.stderr
            status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
            status = f"timeout ({timeout:.0f} s)"
        if self.out:
            with open(self.out / log, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n{output}\n")
        print(output[-4000:], flush=True)
        return self.row(step, status, time.monotonic() - t0), output


def cuda_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None, "capability": None}
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "capability": f"{major}.{minor}"}


def missing_dependencies() -> list[str]:
    """Distributions of pyproject.toml's [project] dependencies (and pytest) that are not installed."""
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.findall(r'"([A-Za-z0-9_.-]+)', text.split("dependencies = [", 1)[1].split("]", 1)[0]) + ["pytest"]
    missing = []
    for name in deps:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def last_json(output: str) -> dict | None:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def test_counts(xml_path: Path) -> dict:
    if not xml_path.is_file():
        return {}
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None][:20]
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install", choices=["editable", "wheel", "skip"], default="editable")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S)
    ap.add_argument("--install-cap-s", type=float, default=INSTALL_CAP_S, help="raise on a slow (CPU dry-run) box")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    check = Check(args.budget_s, out)
    py = sys.executable
    info = cuda_info()
    print(f"[gpu-check] python {py}, GPU: {info['gpu'] or 'none'}", flush=True)

    wheels = sorted((ROOT / "wheels").glob("*.whl"))
    if wheels:
        check.run("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             *map(str, wheels)], 120, "install.log")
    else:
        check.row("wheels", "none", detail="no wheels/*.whl (make gpu-wheels fills it)")
    missing = missing_dependencies()
    check.row("deps", "failed" if missing else "ok",
              detail=f"missing {missing}: add them to .ci/gpu_wheels.txt, run make gpu-wheels" if missing else "")

    env = {"MAX_JOBS": str(os.cpu_count() or 1)}
    if info["capability"]:
        env["TORCH_CUDA_ARCH_LIST"] = info["capability"]  # only the GPU at hand: a third of the compile time
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    if args.install == "editable":
        check.run("install", pip + ["install", "-q", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
                  args.install_cap_s, "install.log", env)
    elif args.install == "wheel":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            check.run("install", pip + ["wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index", "-w", tmp,
                                        "."], args.install_cap_s, "install.log", env)
    else:
        check.row("install", "skipped", detail="--install skip")

    probe = ("import json, torch, dash_kernels as d; from dash_kernels import _ext; C = _ext._C; "
             "has = torch._C._dispatch_has_kernel_for_dispatch_key; "
             "print(json.dumps(dict(has_c=d.HAS_C, with_cuda=bool(C and C.WITH_CUDA), "
             "cuda_ops=[o for o in ('store_kv', 'copy_pages') if d.HAS_C and has('dash::' + o, 'CUDA')])))")
    r, output = check.run("ext", [py, "-c", probe], 60, "install.log")
    ext = last_json(output) or {}
    if r["status"] == "ok" and info["gpu"] and len(ext.get("cuda_ops", [])) != 2:
        r["status"] = "failed"
        r["detail"] = f"_C has no CUDA kernels on a GPU machine: {ext}"
    else:
        r["detail"] = json.dumps(ext)

    xml = (out or Path("/tmp")) / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    reserve = 0 if args.no_bench or not info["gpu"] else BENCH_RESERVE_S
    r, _ = check.run("tests", [py, "-m", "pytest", "-m", "cuda", "tests/gpu", "-q", "-ra", "-p", "no:cacheprovider",
                               f"--junitxml={xml}"], max(check.left() - reserve, 0), "tests.log")
    counts = test_counts(xml)
    r.update(counts=counts, detail=", ".join(f"{counts[k]} {k}" for k in ("passed", "failures", "errors", "skipped"))
             if counts else r["detail"])
    if counts and r["status"].startswith("failed") and not (counts["failures"] or counts["errors"]):
        r["status"] = "failed (no test failed: see tests.log)"

    # bench_fused_loss_gpu first: it holds the fused-loss keys of the final JSON line (FUSED_LOSS_KEYS).
    benches = {"bench_fused_loss_gpu": ["benchmarks/fused_loss_gpu.py", "--device", "cuda"],
               # decode attention, one layer: batch 256 (and 8), 1k-token contexts, Qwen2.5-0.5B heads; ms per call
               "bench_paged_decode": ["benchmarks/paged_decode.py", "--batches", "256,8", "--context", "1024"],
               "bench_fused_loss": ["benchmarks/fused_loss.py", "--device", "cuda", "--variants", "naive,fused",
                                    "--repeats", "1"],
               "bench_step_time": ["benchmarks/step_time.py", "--steps", "2", "--config", "configs/tiny.yaml",
                                   "--model.device=cuda", "--skip-paper-mb", "--plot", ""]}
    for step, cmd in benches.items():
        if args.no_bench or not info["gpu"]:
            check.row(step, "skipped", detail="--no-bench" if args.no_bench else "no CUDA device")
            continue
        r, output = check.run(step, [py, *cmd], check.left(), "bench.log")
        r["result"] = last_json(output)

    fused = next((r.get("result") or {} for r in check.rows if r["step"] == "bench_fused_loss_gpu"), {})
    failed = [r["step"] for r in check.rows if r["status"].startswith(("failed", "timeout"))]
    print(f"\n{'step':18s} {'status':24s} {'s':>7s}  detail")
    for r in check.rows:
        print(f"{r['step']:18s} {r['status']:24s} {r['seconds']:7.1f}  {r['detail'][:90]}")
    summary = {"check": "gpu", **info, "python": sys.version.split()[0], "ok": not failed, "failed_steps": failed,
               "seconds": round(time.monotonic() - check.start, 1), "steps": check.rows,
               **{k: fused.get(k) for k in FUSED_LOSS_KEYS},
               "decode_attn_ms_256": next(((r.get("result") or {}).get("decode_attn_ms_256") for r in check.rows
                                           if r["step"] == "bench_paged_decode"), None)}
    try:
        import torch
        import triton

        summary.update(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__)
    except ImportError:
        pass
    if out:
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
