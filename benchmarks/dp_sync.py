"""Data-parallel gradient sync after DASH filtering: one all-reduce per step vs per-micro-batch sync vs rebalancing.

    python benchmarks/dp_sync.py                 # relaunches itself under torchrun --standalone, 2 processes
    python benchmarks/dp_sync.py --steps 10 --nproc 2 --config configs/tiny.yaml

Every step, each rank samples its share of the step's prompts with the real sampler (tiny task, SFT warm start) and
applies DASH's filter, which leaves the ranks different numbers of kept samples. Then the same training phase (collate,
forward/backward of the kept samples with the global normaliser, gradients summed over ranks; no optimizer step, so
every strategy sees the same weights) runs once per strategy, in a rotating order, each from a barrier; its time is
the max over ranks of barrier-to-done (the step waits for the slowest rank):

  one-sync      dash's DDP mode: local micro-batches, then ONE flat all-reduce of all gradients per step.
  per-mb-sync   a flat all-reduce after every micro-batch's backward (torch DDP without no_sync, minus overlap). Every
                rank must run the same number of micro-batches: the max over ranks (one max all-reduce), the others
                padded with zero-weight one-token micro-batches (dash/rl/fsdp.py's padding).
  ddp           torch DistributedDataParallel without no_sync: bucketed all-reduce overlapped with each backward,
                padded the same way.
  ddp-no-sync   torch DDP with no_sync on all but each rank's last micro-batch (one overlapped sync per step; a rank
                with no kept sample runs one padding micro-batch).
  rebalance     the kept samples are exchanged (all_gather_object) and re-split by tokens (longest first onto the
                least-loaded rank), so every rank trains on an equal share; then one-sync.

Two micro-batch plans: `packed` (DASH: kept samples packed up to the config's token budget) and `paper-mb` (the paper's
fixed 8-row micro-batches). Every strategy's summed gradient is compared with one-sync's (max relative difference in
the JSON; > 1e-3 aborts), so all of them do the same work. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dash.config import load_config  # noqa: E402
from dash.rl.distributed import all_reduce_grads, all_reduce_max, all_reduce_sum, shard_range  # noqa: E402
from dash.rl.fsdp import pad_micro_batch  # noqa: E402
from dash.rl.loss_norm import global_normalizer  # noqa: E402
from dash.rl.optim import gradient_tensors  # noqa: E402
from dash.rl.packing import collate, plan_balanced, plan_fixed  # noqa: E402
from dash.rl.rollout import Rollout, group_advantages, keep_mask  # noqa: E402
from dash.rl.step import PolicyUpdate  # noqa: E402
from dash.rl.trainer import Trainer  # noqa: E402
from common import emit, result  # noqa: E402

WARMUP_STEPS = 1  # first step pays one-time costs (allocator growth, DDP's first-iteration bucket rebuild)
PAPER_MB_ROWS = 8  # the paper's micro-batch size
STRATEGIES = ["one-sync", "per-mb-sync", "ddp", "ddp-no-sync", "rebalance"]
GRAD_CHECK_RTOL = 1e-3  # fp32 sum-order differences are ~1e-6; anything near this means different work


class DDPView:
    """What PolicyUpdate needs of a model (forward_packed, lm_head_weight), with the forward run through torch DDP."""

    def __init__(self, ddp, model):
        self.ddp, self.model = ddp, model

    def forward_packed(self, input_ids, cu_seqlens, positions, shared=None):
        return self.ddp(input_ids, cu_seqlens, positions, shared)

    @property
    def lm_head_weight(self):
        return self.model.lm_head_weight


class PackedForward(torch.nn.Module):
    """DDP hooks `forward`; the trainer's entry point is `forward_packed`."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, cu_seqlens, positions, shared=None):
        return self.inner.forward_packed(input_ids, cu_seqlens, positions, shared=shared)


def plan_rows(cfg, rollout: Rollout, keep: torch.Tensor, plan: str) -> list[list[int]]:
    if plan == "paper-mb":
        return plan_fixed(len(rollout), PAPER_MB_ROWS, keep)
    lengths = [len(p) + len(c) - 1 for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
    rows = len(rollout) if cfg.train.token_budget > 0 else cfg.train.micro_batch_size
    return plan_balanced(lengths, keep, rows, cfg.train.token_budget)


def rebalanced(rollout: Rollout, adv: torch.Tensor, units: list[list[int]], info) -> tuple[Rollout, torch.Tensor,
                                                                                       list[list[int]]]:
    """Exchanges `units` (lists of kept rows: one sample each for `packed`, the paper's micro-batches for `paper-mb`,
    whose composition must not change) and returns this rank's share: a local rollout, its advantages and its units
    as row lists. Shares have equal unit counts (+-1) and near-equal tokens (longest first onto the least-loaded rank
    with room: plan_balanced over units)."""
    mine = [[(rollout.prompt_ids[i], rollout.completion_ids[i], float(adv[i]), rollout.old_logp[i].tolist())
             for i in unit] for unit in units]
    every: list = [None] * info.world_size
    dist.all_gather_object(every, mine)  # the same list, in rank order, on every rank
    pool = [unit for part in every for unit in part]
    tokens = [sum(len(p) + len(c) for p, c, _, _ in unit) for unit in pool]
    bins = plan_balanced(tokens, torch.ones(len(pool), dtype=torch.bool), -(-len(pool) // info.world_size), 0)
    share = [pool[j] for j in bins[info.rank]] if info.rank < len(bins) else []
    rows = [r for unit in share for r in unit]
    starts = [sum(len(u) for u in share[:k]) for k in range(len(share))]
    out = Rollout([r[0] for r in rows], [r[1] for r in rows], [torch.tensor(r[3]) for r in rows],
                  torch.zeros(len(rows)), 1)
    return out, torch.tensor([r[2] for r in rows], dtype=torch.float32), [
        list(range(a, a + len(u))) for a, u in zip(starts, share)]


def train_phase(strategy: str, plan: str, cfg, update, ddp_update, rollout, keep, adv, norm, info) -> dict:
    """One strategy's training phase; returns this rank's compute seconds, micro-batches and pads."""
    device = torch.device("cpu")
    if strategy == "rebalance":  # packed: move samples, then pack; paper-mb: move whole micro-batches
        units = plan_rows(cfg, rollout, keep, plan) if plan == "paper-mb" else [[i] for i in keep.nonzero()[:, 0]]
        rollout, adv, units = rebalanced(rollout, adv, units, info)
        plan_idx = units if plan == "paper-mb" else plan_rows(cfg, rollout, torch.ones(len(rollout), dtype=torch.bool),
                                                               plan)
    else:
        plan_idx = plan_rows(cfg, rollout, keep, plan)
    mbs = [collate(rollout, idx, adv, device, cfg.train.share_prompts) for idx in plan_idx]  # as the trainer packs
    n_real = len(mbs)
    if strategy in ("per-mb-sync", "ddp"):
        most = int(all_reduce_max([float(len(mbs))], info)[0])
        mbs += [None] * (most - len(mbs))
    elif strategy == "ddp-no-sync" and not mbs:
        mbs = [None]
    runner = ddp_update if strategy.startswith("ddp") else update
    t0 = time.perf_counter()
    for k, mb in enumerate(mbs):
        last = k == len(mbs) - 1
        ctx = ddp_update.model.ddp.no_sync() if strategy == "ddp-no-sync" and not last else nullcontext()
        with ctx:
            if mb is None:
                runner.backward(pad_micro_batch(device), None, None)
            else:
                runner.backward(mb, norm, None)
        if strategy == "per-mb-sync":  # DDP's semantics: mean of accumulated grads
            all_reduce_grads(gradient_tensors(update.optimizer, update.model), info, [], average=True)
    compute_s = time.perf_counter() - t0
    if strategy in ("one-sync", "rebalance"):
        all_reduce_grads(gradient_tensors(update.optimizer, update.model), info, [], average=False)
    else:  # DDP and its per-micro-batch emulation average over ranks: back to the sum, for the gradient check
        for p in update.model.parameters():
            if p.grad is not None:
                p.grad.mul_(info.world_size)
    return {"compute_s": compute_s, "mbs": n_real, "pads": len(mbs) - n_real}


def flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


def worker(args, overrides: list[str]) -> None:
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides + ["--train.algorithm=dash", f"--log.out_dir={args.worker}.run"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    info, model, t = trainer.dist, trainer.model, cfg.train
    update = PolicyUpdate(cfg, model, None, None)
    ddp_model = torch.nn.parallel.DistributedDataParallel(PackedForward(model), broadcast_buffers=False)
    ddp_update = PolicyUpdate(cfg, DDPView(ddp_model, model), None, None)
    times = {(p, s): [] for p in ("packed", "paper-mb") for s in STRATEGIES}
    stats = {key: [] for key in times}
    worst = {key: 0.0 for key in times}
    for step in range(WARMUP_STEPS + args.steps):
        examples = trainer.train_data.next_batch(t.prompts_per_step)
        lo, hi = shard_range(len(examples), info)
        with torch.no_grad():
            rollout = trainer.sampler.sample(examples[lo:hi], t.group_size, t.seed, step, lo)
        adv = group_advantages(rollout.rewards, t.group_size)  # [S]
        keep = keep_mask(adv, cfg.loss.adv_threshold) & torch.tensor([len(c) > 0 for c in rollout.completion_ids])
        samples, tokens = all_reduce_sum([float(len(rollout)), float(rollout.completion_tokens())], info)
        norm = global_normalizer(cfg.loss.loss_type, int(samples), int(tokens), cfg.sampling.max_new_tokens)
        for plan in ("packed", "paper-mb"):
            order = STRATEGIES[step % len(STRATEGIES):] + STRATEGIES[:step % len(STRATEGIES)]
            reference = None
            for strategy in sorted(order, key=lambda s: s != "one-sync"):  # one-sync first: the gradient reference
                model.zero_grad(set_to_none=True)
                dist.barrier()
                t0 = time.perf_counter()
                out = train_phase(strategy, plan, cfg, update, ddp_update, rollout, keep, adv, norm, info)
                wall = all_reduce_max([time.perf_counter() - t0], info)[0]
                computes = [0.0] * info.world_size
                computes[info.rank] = out["compute_s"]
                computes = all_reduce_sum(computes, info)
                g = flat_grads(model)
                if reference is None:
                    reference = g.clone()
                rel = float((g - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
                if rel > GRAD_CHECK_RTOL:
                    raise RuntimeError(f"{plan}/{strategy}: gradient differs from one-sync by {rel:.2e} (relative)")
                if step >= WARMUP_STEPS:
                    times[(plan, strategy)].append(wall)
                    worst[(plan, strategy)] = max(worst[(plan, strategy)], rel)
                    stats[(plan, strategy)].append({"lost_s": max(computes) - statistics.fmean(computes), **out})
    # Lost to imbalance = max - mean over ranks of the backward loop's time; only where that loop has no collective
    # inside (one-sync, rebalance). Per-micro-batch syncs hide the waiting inside the loop; their cost is in `ms`.
    with_lost = ("one-sync", "rebalance")
    if info.is_main:
        rows = []
        for (plan, strategy), walls in times.items():
            st = stats[(plan, strategy)]
            rows.append({"plan": plan, "strategy": strategy, "ms": 1e3 * statistics.fmean(walls),
                         "p50_ms": 1e3 * statistics.median(walls),
                         "lost_to_imbalance_ms": 1e3 * statistics.fmean(s["lost_s"] for s in st)
                         if strategy in with_lost else None,
                         "mbs_rank0": statistics.fmean(s["mbs"] for s in st),
                         "pads_rank0": statistics.fmean(s["pads"] for s in st),
                         "max_rel_grad_diff": worst[(plan, strategy)]})
        Path(args.worker).write_text(json.dumps(rows))
    trainer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps (each runs every strategy and plan)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one torchrun rank; rank 0 writes rows here
    args, overrides = parser.parse_known_args()
    if args.worker:
        worker(args, overrides)
        return 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    out = Path(f"/tmp/dash-dp-sync-{os.getpid()}.json")
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(args.nproc), __file__, "--worker", str(out),
           "--config", args.config, "--steps", str(args.steps), "--threads", str(args.threads), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    rows = json.loads(out.read_text())
    out.unlink()
    shutil.rmtree(f"{out}.run", ignore_errors=True)
    lines = [f"\ntraining-phase time per step (max over {args.nproc} ranks), {args.steps} timed steps, "
             f"{args.threads} torch thread(s) per process, load average {load_start:.2f} at start"]
    header = f"{'plan':<10}{'strategy':<13}{'ms':>8}{'p50':>8}{'vs one':>8}{'lost':>8}{'mbs r0':>8}{'pads r0':>8}"
    lines += [header, "-" * len(header)]
    base = {r["plan"]: r["ms"] for r in rows if r["strategy"] == "one-sync"}
    for r in rows:
        lost = "-" if r["lost_to_imbalance_ms"] is None else f"{r['lost_to_imbalance_ms']:.1f}"
        lines.append(f"{r['plan']:<10}{r['strategy']:<13}{r['ms']:>8.1f}{r['p50_ms']:>8.1f}"
                     f"{r['ms'] / base[r['plan']]:>8.2f}{lost:>8}{r['mbs_rank0']:>8.1f}{r['pads_rank0']:>8.1f}")
    emit("\n".join(lines), result("dp_sync", "cpu", nproc=args.nproc, steps=args.steps, config=Path(args.config).name,
                                  overrides=overrides, rows=rows, threads_per_process=args.threads,
                                  load_start=load_start, load_end=os.getloadavg()[0],
                                  wall_s=time.perf_counter() - t_start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
