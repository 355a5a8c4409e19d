"""Is the tiny task's RL plateau the trainer's or the warm start's? Three arms from the config's SFT warm start:

1. `trainer`: dash's DASH trainer (the `--config`, default configs/tiny.yaml, at `--lr` for `--steps` steps);
2. `independent`: a plain policy-gradient loop that shares no code with dash's trainer, sampler or loss: transformers'
   Qwen2ForCausalLM loaded from the same folder, its own KV-cache sampling at temperature 1, A = reward - group mean,
   loss = -mean over completion tokens (EOS included) of A * log p, AdamW at `--lr`, no clipping, no filtering;
3. `supervised`: continued SFT on the gold answers (teacher forcing, batch 128, AdamW at `--lr`): how far the same
   number of steps gets when the right answer is given rather than discovered.
All three see 64 fresh training prompts per step (x G=4 samples for the RL arms) and are evaluated with greedy
decoding on the same 500 held-out prompts every `--eval-every` steps (one evaluation's standard error is ~2 points).
Shares only the tokenizer, the task's splits and its reward with dash.

    python benchmarks/rl_crosscheck.py                 # 300 steps per arm, ~5 minutes on 1 thread
    python benchmarks/rl_crosscheck.py --steps 100 --lr 1e-5
    python benchmarks/rl_crosscheck.py --config configs/tiny-add.yaml --lr 1e-4 --out benchmarks/results/rl_crosscheck_add

Prints a table (step x arm accuracy, seconds per step), then one JSON line; writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from common import emit, result  # noqa: E402
from trainer_runs import quiet_trainer, train_with_evals  # noqa: E402

from dash.config import load_config  # noqa: E402
from dash.rl.task_data import arith_task  # noqa: E402
from dash.tasks.arith import arith_reward  # noqa: E402
from dash.runtime import resolve_model_path  # noqa: E402
from dash.rl.warmstart import load_warmstart  # noqa: E402

PROMPTS, G, SFT_BATCH, MAX_NEW, EVAL_CHUNK = 64, 4, 128, 8, 250


class Independent:
    """The warm start as a transformers model, with greedy / sampled decoding and the task's splits."""

    def __init__(self, folder: Path, splits: tuple[list, list], seed: int) -> None:
        _, self.tok, _ = load_warmstart(folder)  # the tokenizer only
        self.model = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.train, self.test = splits
        self.eos = self.tok.eos_token_id
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.cursor = torch.randperm(len(self.train), generator=self.gen).tolist(), 0
        self.opt = None

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if len({len(x) for x in ids}) != 1:
            raise ValueError("the tiny task's prompts are zero-padded to one length; got several")
        return torch.tensor(ids)  # [B, P]

    def next_batch(self, n: int) -> list:
        if self.cursor + n > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.train), generator=self.gen).tolist(), 0
        self.cursor += n
        return [self.train[i] for i in self.order[self.cursor - n:self.cursor]]

    @torch.no_grad()
    def decode(self, prompts: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P] -> completions [B, L] and mask [B, L] of the tokens up to and including the first EOS."""
        self.model.eval()
        out, cache, step_in, outs = None, None, prompts, []
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for _ in range(MAX_NEW):
            out = self.model(step_in, cache=cache, use_cache=True)  # transformers 5.x names the KV cache `cache`
            cache, logits = out.cache, out.logits[:, -1].float()  # [B, V]
            nxt = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1, generator=self.gen)[:, 0]
            outs.append(torch.where(done, self.eos, nxt))
            done |= nxt == self.eos
            step_in = nxt[:, None]
            if bool(done.all()):
                break
        comp = torch.stack(outs, 1)  # [B, L]
        is_eos = (comp == self.eos).long()
        return comp, (is_eos.cumsum(1) - is_eos) == 0

    def rewards(self, comp: torch.Tensor, mask: torch.Tensor, answers: list[str]) -> torch.Tensor:
        texts = [self.tok.decode(row[m].tolist(), skip_special_tokens=False) for row, m in zip(comp, mask)]
        return torch.tensor([arith_reward(t, a) for t, a in zip(texts, answers)])

    def accuracy(self) -> float:
        right = 0.0
        for i in range(0, len(self.test), EVAL_CHUNK):
            chunk = self.test[i:i + EVAL_CHUNK]
            comp, mask = self.decode(self.encode([e.prompt for e in chunk]), greedy=True)
            right += float(self.rewards(comp, mask, [e.answer for e in chunk]).sum())
        return right / len(self.test)

    def token_logp(self, prompts: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
        """log p of each completion token under the current weights: [B, L]."""
        self.model.train()
        logits = self.model(torch.cat([prompts, comp], 1)).logits[:, prompts.shape[1] - 1:-1].float()  # [B, L, V]
        return logits.log_softmax(-1).gather(2, comp[:, :, None])[:, :, 0]

    def step(self, lr: float, supervised: bool) -> None:
        if self.opt is None:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        if supervised:  # teacher forcing on the gold answer + EOS
            batch = self.next_batch(SFT_BATCH)
            prompts = self.encode([e.prompt for e in batch])
            targets = [self.tok(e.answer, add_special_tokens=False)["input_ids"] + [self.eos] for e in batch]
            width = max(map(len, targets))
            comp = torch.tensor([t + [self.eos] * (width - len(t)) for t in targets])  # [B, L]
            mask = torch.arange(width)[None, :] < torch.tensor([len(t) for t in targets])[:, None]
            loss = -(self.token_logp(prompts, comp) * mask).sum() / mask.sum()
        else:
            batch = self.next_batch(PROMPTS)
            prompts = self.encode([e.prompt for e in batch]).repeat_interleave(G, 0)  # [S, P]
            comp, mask = self.decode(prompts, greedy=False)
            r = self.rewards(comp, mask, [e.answer for e in batch for _ in range(G)]).view(-1, G)  # [B, G]
            adv = (r - r.mean(1, keepdim=True)).reshape(-1, 1)  # [S, 1]
            loss = -(adv * self.token_logp(prompts, comp) * mask).sum() / mask.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def run_independent(folder: Path, splits, seed: int, steps: int, eval_every: int, lr: float, supervised: bool):
    torch.manual_seed(seed)
    arm = Independent(folder, splits, seed)
    curve, train_s = [{"step": 0, "acc": arm.accuracy()}], 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        arm.step(lr, supervised)
        train_s += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "acc": arm.accuracy()})
    return curve, train_s / steps


def run_trainer(config: str, steps: int, eval_every: int, lr: float):
    base = load_config(config, [])
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=steps, lr=lr))
    trainer = quiet_trainer(cfg, "dash-crosscheck-")
    try:
        curve, rows = train_with_evals(trainer, steps, eval_every)
    finally:
        trainer.close()
    return [{"step": p["step"], "acc": p["acc"]} for p in curve], sum(r["time/step_s"] for r in rows) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/rl_crosscheck"))
    args = parser.parse_args()
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be >= 1")
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    folder = resolve_model_path(cfg.model.path)  # the trainer's warm start
    _, *splits = arith_task(cfg.data)  # the trainer's own train / held-out split
    arms = {
        "trainer": run_trainer(args.config, args.steps, args.eval_every, args.lr),
        "independent": run_independent(folder, splits, args.seed, args.steps, args.eval_every, args.lr, supervised=False),
        "supervised": run_independent(folder, splits, args.seed, args.steps, args.eval_every, args.lr, supervised=True),
    }
    steps = [p["step"] for p in arms["trainer"][0]]
    table = ["| step | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for i, s in enumerate(steps):
        table.append(f"| {s} | " + " | ".join(f"{curve[i]['acc']:.3f}" for curve, _ in arms.values()) + " |")
    table.append("| s / step | " + " | ".join(f"{sps:.3f}" for _, sps in arms.values()) + " |")
    fields = {"steps": args.steps, "lr": args.lr, "seed": args.seed, "acc_start": arms["trainer"][0][0]["acc"],
              "threads": torch.get_num_threads()}
    for name, (curve, sps) in arms.items():
        fields.update({f"{name}_acc_end": curve[-1]["acc"], f"{name}_acc_best": max(p["acc"] for p in curve),
                       f"{name}_s_per_step": round(sps, 4), f"{name}_curve": [p["acc"] for p in curve]})
    head = (f"# RL cross-check on {Path(args.config).name} ({args.steps} steps per arm, lr {args.lr}, seed {args.seed})"
            "\n\n"
            "Produced by `python benchmarks/rl_crosscheck.py`; held-out greedy accuracy (500 prompts).\n\n")
    emit("\n".join(table), result("rl_crosscheck", "cpu", **fields), args.out, heading=head)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
