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
  bench_*  when a GPU is present, each under its own cap (BENCHES) and the overall deadline, in this order:
           benchmarks/fused_loss_gpu.py (N=16384, H=896, V=151936 bf16: fused vs naive, torch linear_cross_entropy,
           Liger), benchmarks/paged_decode.py (decode attention ms per call, batch 256, 1k-token contexts,
           Qwen2.5-0.5B heads), benchmarks/sampler.py --gpu (random Qwen2.5-0.5B, bf16: dash vs HF generate tok/s at
           batch 8 and 256, 256-token prompts, 512 new tokens, HF at batch 256 shortened to HF_NEW_TOKENS_256, the
           presets' sampling), benchmarks/decode_step.py (ms and kernel launches per engine decode step, batch 256,
           1k-token contexts), benchmarks/step_time.py at the paper preset's shape with a random 0.5B model and
           completions shortened to STEP_TIME_NEW_TOKENS, then benchmarks/fused_loss.py if time is left
  tests    pytest -m cuda tests/gpu with the time left (on a machine without CUDA every test is skipped with the reason)
A failing or timed-out benchmark is recorded (its keys null, its error in `bench_errors`) and the next one runs.
`--bench-dry-run` runs every benchmark's CPU dry run instead (tiny shapes, no GPU needed): the harness's own test.
The last line is one JSON line (benchmarks/common.py's format, "bench": "gpu_check") with the headline numbers
(HEADLINE) and every step; it is saved to $OUT/gpu_check.json and, after a GPU run, to RESULTS_FILE.
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
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS_FILE = ROOT / "benchmarks/results/gpu/gpu_check.json"
BUDGET_S = 480  # the 8 minutes, everything included
INSTALL_CAP_S = 300  # building _C with CUDA on 16 cores takes about two minutes
PRINT_TAIL_CHARS = 6000  # of each step's output, on stdout (all of it goes to $OUT/<log>)
MIN_STEP_S = 30  # a step with less time than this left is skipped, not started
HF_NEW_TOKENS_256 = 256  # HF generate at batch 256 makes this many new tokens (dash 512): ~10 s saved, said in JSON
STEP_TIME_NEW_TOKENS = 64  # GRPO's 32 sampling calls of 8 per step at 2048 tokens would take minutes per step
DRY_RUN_CAP_FACTOR = 6  # --bench-dry-run: CPU interpreter runs on a loaded 2-core box take minutes, not seconds
TESTS_RESERVE_S = 120  # budget a benchmark may not eat into (unless --no-tests): the cuda tests' time
# step -> (command on a GPU, its CPU dry run, cap in seconds). Caps: about twice the expected time on an H100 (about
# 240 s together), so after a two-minute build the benchmarks and the tests both fit the 8 minutes.
BENCHES = {
    "bench_fused_loss_gpu": (["benchmarks/fused_loss_gpu.py", "--device", "cuda"],
                             ["benchmarks/fused_loss_gpu.py", "--device", "cpu", "--n", "64", "--h", "32", "--v",
                              "300", "--repeats", "1", "--warmup", "0"], 60),
    "bench_paged_decode": (["benchmarks/paged_decode.py", "--batches", "256,8", "--context", "1024"],
                           ["benchmarks/paged_decode.py", "--dry-run"], 45),
    "bench_sampler": (["benchmarks/sampler.py", "--gpu", "--repeats", "1", "--hf-new-tokens-256",
                       str(HF_NEW_TOKENS_256)], ["benchmarks/sampler.py", "--gpu", "--dry-run", "--repeats", "1"], 120),
    "bench_decode_step": (["benchmarks/decode_step.py", "--repeats", "2"],
                          ["benchmarks/decode_step.py", "--dry-run", "--repeats", "1"], 60),
    "bench_step_time": (["benchmarks/step_time.py", "--config", "configs/qwen2.5-0.5b-math.yaml", "--random-model",
                         "qwen2.5-0.5b", "--steps", "1", "--skip-paper-mb", "--plot", "",
                         f"--sampling.max_new_tokens={STEP_TIME_NEW_TOKENS}"],
                        ["benchmarks/step_time.py", "--config", "configs/qwen2.5-0.5b-math.yaml", "--random-model",
                         "tiny", "--steps", "1", "--skip-paper-mb", "--plot", "", "--model.device=cpu",
                         "--model.dtype=float32", "--sampling.max_new_tokens=4", "--train.prompts_per_step=8"], 120),
    "bench_fused_loss": (["benchmarks/fused_loss.py", "--device", "cuda", "--variants", "naive,fused", "--repeats",
                          "1"], None, 60),
}
# final JSON key -> (step, key in that step's JSON line); null when the step failed, was skipped or lacks the key
HEADLINE = {
    "sampler_vs_hf_256": ("bench_sampler", "sampler_vs_hf_256"),
    "sampler_vs_hf_8": ("bench_sampler", "sampler_vs_hf_8"),
    "hf_new_tokens_256": ("bench_sampler", "hf_new_tokens_256"),
    "decode_step_ms_256": ("bench_decode_step", "decode_step_ms_256"),
    "launches_per_step_256": ("bench_decode_step", "launches_per_step_256"),
    "kernels_per_step_256": ("bench_decode_step", "kernels_per_step_256"),
    # the same step without CUDA graphs: the graphs' gain is decode_step_ms_256_eager / decode_step_ms_256
    "decode_step_ms_256_eager": ("bench_decode_step", "decode_step_ms_256_eager"),
    "launches_per_step_256_eager": ("bench_decode_step", "launches_per_step_256_eager"),
    "decode_attn_ms_256": ("bench_paged_decode", "decode_attn_ms_256"),
    **{k: ("bench_fused_loss_gpu", k) for k in ("fused_fwd_peak_frac", "fused_bwd_over_fwd", "fused_mem_frac_naive",
                                                "fused_vs_liger")},
    "dash_grpo_ratio": ("bench_step_time", "ratio"),
    "dash_s_per_step": ("bench_step_time", "dash_s_per_step"),
}


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

    def run(self, step: str, cmd: list[str], cap_s: float, log: str, env: dict | None = None, reserve_s: float = 0):
        """Runs cmd with a timeout of min(cap_s, time left - reserve_s); its output goes to stdout and $OUT/<log>."""
        timeout = min(cap_s, self.left() - reserve_s)
        if timeout < MIN_STEP_S:
            return self.row(step, "skipped", detail=f"only {self.left():.0f} s of the budget left, {reserve_s:.0f} s "
                                                    f"of it kept for later steps"), ""
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                  timeout=timeout, check=False)
            output = proc.stderr + proc.stdout  # stdout (a benchmark's table and JSON line) last
            status = "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})"
        except subprocess.TimeoutExpired as exc:
            output = _text(exc.stderr) + _text(exc.stdout)
            status = f"timeout ({timeout:.0f} s)"
        if self.out:
            with open(self.out / log, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n{output}\n")
        print(output[-PRINT_TAIL_CHARS:], flush=True)
        return self.row(step, status, time.monotonic() - t0), output


def _text(out) -> str:
    """A timed-out subprocess's partial output (bytes, str or None) as text."""
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def error_tail(output: str, lines: int = 6) -> str:
    """The last lines of a failed step's output: the exception, in a benchmark's case."""
    return "\n".join(output.strip().splitlines()[-lines:])[-1000:]


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
    ap.add_argument("--bench-dry-run", action="store_true", help="each benchmark's CPU dry run (tiny shapes)")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest step")
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

    bench_errors = {}
    for step, (gpu_cmd, dry_cmd, cap_s) in BENCHES.items():
        cmd = dry_cmd if args.bench_dry_run else gpu_cmd
        if args.no_bench or cmd is None or not (info["gpu"] or args.bench_dry_run):
            check.row(step, "skipped", detail="--no-bench" if args.no_bench else "no CUDA device" if cmd else
                      "no dry run")
            continue
        try:  # one benchmark's failure (even in this harness) must not lose the others
            cap_s *= DRY_RUN_CAP_FACTOR if args.bench_dry_run else 1
            r, output = check.run(step, [py, *cmd], cap_s, "bench.log",
                                  reserve_s=0 if args.no_tests else TESTS_RESERVE_S)
            r["result"] = last_json(output)
            if r["status"] not in ("ok", "skipped"):
                bench_errors[step] = f"{r['status']}: {error_tail(output)}"
        except Exception as exc:  # noqa: BLE001
            check.row(step, "failed (harness)", detail=repr(exc)[:200])
            bench_errors[step] = repr(exc)

    xml = (out or Path("/tmp")) / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    if args.no_tests:
        check.row("tests", "skipped", detail="--no-tests")
    else:
        r, _ = check.run("tests", [py, "-m", "pytest", "-m", "cuda", "tests/gpu", "-q", "-ra", "-p",
                                   "no:cacheprovider", f"--junitxml={xml}"], check.left(), "tests.log")
        counts = test_counts(xml)
        r.update(counts=counts, detail=", ".join(f"{counts[k]} {k}" for k in ("passed", "failures", "errors",
                                                                             "skipped")) if counts else r["detail"])
        if counts and r["status"].startswith("failed") and not (counts["failures"] or counts["errors"]):
            r["status"] = "failed (no test failed: see tests.log)"

    results = {r["step"]: r.get("result") or {} for r in check.rows}
    failed = [r["step"] for r in check.rows if r["status"].startswith(("failed", "timeout"))]
    print(f"\n{'step':22s} {'status':24s} {'s':>7s}  detail")
    for r in check.rows:
        print(f"{r['step']:22s} {r['status']:24s} {r['seconds']:7.1f}  {r['detail'][:90]}")
    from common import result  # benchmarks/common.py: the JSON line every benchmark shares (imports torch)

    headline = {key: results.get(step, {}).get(field) for key, (step, field) in HEADLINE.items()}
    summary = result("gpu_check", "cuda" if info["gpu"] else "cpu", **headline, capability=info["capability"],
                     bench_dry_run=args.bench_dry_run, ok=not failed, failed_steps=failed, bench_errors=bench_errors,
                     seconds=round(time.monotonic() - check.start, 1), python=sys.version.split()[0],
                     steps=check.rows)
    try:
        import torch
        import triton

        summary.update(cuda=torch.version.cuda, triton=triton.__version__)
    except ImportError:
        pass
    text = json.dumps(summary)
    saves = ([out / "gpu_check.json"] if out else []) + ([RESULTS_FILE] if info["gpu"] and not args.no_bench
                                                          and not args.bench_dry_run else [])
    for path in saves:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
