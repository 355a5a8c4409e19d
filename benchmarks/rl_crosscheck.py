"""Does RL learn from reward what the SFT data did not teach? Three arms per seed from the config's SFT warm start:

1. `trainer`: dash's trainer (the `--config`, at `--lr` for `--steps` steps, `train.seed` = the seed);
2. `independent`: a plain policy-gradient loop that shares no code with dash's trainer, sampler or loss: transformers'
   Qwen2ForCausalLM loaded from the same folder, its own KV-cache sampling at temperature 1 (prompts of several
   lengths are left-padded with an attention mask and position ids, so a padded row computes what it would alone),
   A = reward - group mean, loss = -mean over completion tokens (EOS included) of A * log p, AdamW at `--lr`, no
   clipping, no filtering;
3. `supervised`: the annealing control, continued SFT from the same start on the task's SFT traces (`example.solution`:
   the answer + EOS on arith, the demonstrator's trace on scratchpad), teacher forcing, `--sft-batch` traces per step,
   AdamW at the same lr for the same steps as the RL arms. It answers: is the RL gain more than what any further
   training at this lr gives?
The RL arms see `train.prompts_per_step` prompts x `train.group_size` samples of at most `sampling.max_new_tokens`
tokens per step, all from the config. Every arm is evaluated with greedy decoding on the same `data.test_size`
held-out prompts every `--eval-every` steps. Shares only the tokenizer, the task's splits (data.task arith or
scratchpad) and its reward (`data.reward`) with dash.

The claim rule (benchmarks/learning_claim.py): per seed, d = acc(trainer) - acc(supervised) at the end and
se = sqrt(p1(1-p1)/n + p2(1-p2)/n) over the n held-out prompts. "RL beats the supervised control" holds only if
`--seeds` K >= 3 and d > 2 se for every seed; the mean d over seeds is reported beside the verdict.

Design limits: `--steps` and `--lr` default to the config's train.steps and train.lr. A seed s sets train.seed = s for
the trainer and the sampling / data-order generator of the two loops here; the data split (data.seed) never changes,
because the warm start was trained on it. The independent loop is plain, not fast: every row of a batch runs until
the longest completion ends and the full padded sequence is re-run for the gradient.

    python benchmarks/rl_crosscheck.py --config configs/tiny-scratchpad.yaml --seeds 3 \
        --out benchmarks/results/rl_vs_sft
    python benchmarks/rl_crosscheck.py --config configs/tiny-add.yaml --out benchmarks/results/rl_crosscheck_add
    python benchmarks/rl_crosscheck.py --steps 2 --arms trainer,supervised --data.test_size=64   # + config overrides

Prints a table of mean accuracy (step x arm) and seconds per step, a per-seed table with the claim's verdict, then
one JSON line; writes <out>.md, <out>.json and <out>.png (accuracy vs step, one line per arm and seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from common import emit, result  # noqa: E402
from learning_claim import RULE, Z, learning_claim  # noqa: E402
from trainer_runs import quiet_trainer, train_with_evals  # noqa: E402

from dash.config import BUILTIN_TASKS, load_config  # noqa: E402
from dash.rewards import RewardSum, get_reward  # noqa: E402
from dash.rl.task_data import builtin_task  # noqa: E402
from dash.rl.warmstart import load_warmstart  # noqa: E402
from dash.runtime import resolve_model_path  # noqa: E402

ARMS = ("trainer", "independent", "supervised")
SFT_BATCH = 128  # traces per supervised step: at least the RL arms' prompts, so the control is not starved
EVAL_CHUNK = 250  # held-out prompts per greedy decode: bounds the KV cache, amortises per-call overhead


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """What every arm of one run shares: steps, lr and evaluation from the command line, batch shape from the config."""

    steps: int
    eval_every: int
    lr: float
    prompts: int  # train.prompts_per_step
    group: int  # train.group_size
    max_new: int  # sampling.max_new_tokens
    eval_max_new: int  # eval.max_new_tokens, or sampling's
    sft_batch: int


class Independent:
    """The warm start as a transformers model, with greedy / sampled decoding, the task's splits and its reward."""

    def __init__(self, folder: Path, splits: tuple[list, list], reward, budget: Budget, seed: int) -> None:
        _, self.tok, _ = load_warmstart(folder)  # the tokenizer only
        self.model = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.context = self.model.config.max_position_embeddings
        self.train, self.test = splits
        self.reward, self.budget = reward, budget
        self.eos = self.tok.eos_token_id
        self.pad = self.eos if self.tok.pad_token_id is None else self.tok.pad_token_id
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.cursor = torch.randperm(len(self.train), generator=self.gen).tolist(), 0
        self.opt = None

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids [B, P] and attention mask [B, P] (1 on real tokens): every row's last prompt token sits in
        the last column, so all completions start in the same column."""
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(map(len, ids))
        padded = torch.tensor([[self.pad] * (width - len(x)) + x for x in ids])  # [B, P]
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])  # [B, P]
        return padded, mask

    @staticmethod
    def positions(mask: torch.Tensor) -> torch.Tensor:
        """[B, T] mask -> [B, T] position ids: each row's first real token at 0, as it would be alone (pads get 0)."""
        return (mask.cumsum(1) - 1).clamp(min=0)

    def next_batch(self, n: int) -> list:
        if self.cursor + n > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.train), generator=self.gen).tolist(), 0
        self.cursor += n
        return [self.train[i] for i in self.order[self.cursor - n:self.cursor]]

    @torch.no_grad()
    def decode(self, prompts: torch.Tensor, pmask: torch.Tensor, greedy: bool,
               max_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts, pmask [B, P] -> completions [B, L] and mask [B, L] of the tokens up to and including the first
        EOS; at most `max_new` tokens, capped by the model's context."""
        self.model.eval()
        mask, pos, step_in, cache, outs = pmask, self.positions(pmask), prompts, None, []
        done = torch.zeros(len(prompts), dtype=torch.bool)  # [B]
        for _ in range(min(max_new, self.context - prompts.shape[1])):
            out = self.model(step_in, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1].float()  # [B, V]; transformers 5.x names the KV cache `cache`
            nxt = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1, generator=self.gen)[:, 0]
            outs.append(torch.where(done, self.eos, nxt))
            done |= nxt == self.eos
            if bool(done.all()):
                break
            step_in, pos = nxt[:, None], pos[:, -1:] + 1  # [B, 1]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # [B, P + t]
        comp = torch.stack(outs, 1)  # [B, L]
        is_eos = (comp == self.eos).long()
        return comp, (is_eos.cumsum(1) - is_eos) == 0

    def rewards(self, comp: torch.Tensor, mask: torch.Tensor, answers: list[str]) -> torch.Tensor:
        texts = [self.tok.decode(row[m].tolist(), skip_special_tokens=False) for row, m in zip(comp, mask)]
        return torch.tensor([float(self.reward(t, a)) for t, a in zip(texts, answers)])  # [B]

    def accuracy(self) -> float:
        right = 0.0
        for i in range(0, len(self.test), EVAL_CHUNK):
            chunk = self.test[i:i + EVAL_CHUNK]
            comp, mask = self.decode(*self.encode([e.prompt for e in chunk]), greedy=True,
                                     max_new=self.budget.eval_max_new)
            right += float(self.rewards(comp, mask, [e.answer for e in chunk]).sum())
        return right / len(self.test)

    def token_logp(self, prompts: torch.Tensor, pmask: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
        """log p of each completion token under the current weights: prompts, pmask [B, P], comp [B, L] -> [B, L]."""
        self.model.train()
        mask = torch.cat([pmask, torch.ones_like(comp)], 1)  # [B, P + L]; causal: tokens after EOS affect none before
        logits = self.model(torch.cat([prompts, comp], 1), attention_mask=mask,
                            position_ids=self.positions(mask)).logits[:, prompts.shape[1] - 1:-1].float()  # [B, L, V]
        return logits.log_softmax(-1).gather(2, comp[:, :, None])[:, :, 0]

    def trace_ids(self, solution: str) -> list[int]:
        """The SFT trace's token ids, ending with EOS (the tokenizer reads the `<eos>` text as the EOS token)."""
        ids = self.tok(solution, add_special_tokens=False)["input_ids"]
        return ids if ids and ids[-1] == self.eos else ids + [self.eos]

    def step(self, supervised: bool) -> None:
        b = self.budget
        if self.opt is None:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=b.lr, weight_decay=0.0)
        if supervised:  # teacher forcing on the task's SFT trace (+ EOS)
            batch = self.next_batch(b.sft_batch)
            prompts, pmask = self.encode([e.prompt for e in batch])
            targets = [self.trace_ids(e.solution) for e in batch]
            width = max(map(len, targets))
            comp = torch.tensor([t + [self.eos] * (width - len(t)) for t in targets])  # [B, L]
            mask = torch.arange(width)[None, :] < torch.tensor([len(t) for t in targets])[:, None]  # [B, L]
            loss = -(self.token_logp(prompts, pmask, comp) * mask).sum() / mask.sum()
        else:
            batch = self.next_batch(b.prompts)
            prompts, pmask = (x.repeat_interleave(b.group, 0) for x in self.encode([e.prompt for e in batch]))  # [S, P]
            comp, mask = self.decode(prompts, pmask, greedy=False, max_new=b.max_new)
            r = self.rewards(comp, mask, [e.answer for e in batch for _ in range(b.group)]).view(-1, b.group)  # [B, G]
            adv = (r - r.mean(1, keepdim=True)).reshape(-1, 1)  # [S, 1]
            loss = -(adv * self.token_logp(prompts, pmask, comp) * mask).sum() / mask.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def run_independent(folder: Path, splits, reward, budget: Budget, seed: int, supervised: bool):
    torch.manual_seed(seed)
    arm = Independent(folder, splits, reward, budget, seed)
    curve, train_s = [{"step": 0, "acc": arm.accuracy()}], 0.0
    for step in range(1, budget.steps + 1):
        t0 = time.perf_counter()
        arm.step(supervised)
        train_s += time.perf_counter() - t0
        if step % budget.eval_every == 0 or step == budget.steps:
            curve.append({"step": step, "acc": arm.accuracy()})
    return curve, train_s / budget.steps


def run_trainer(base, budget: Budget, seed: int):
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=budget.steps, lr=budget.lr, seed=seed))
    trainer = quiet_trainer(cfg, "dash-crosscheck-")
    try:
        curve, rows = train_with_evals(trainer, budget.steps, budget.eval_every)
    finally:
        trainer.close()
    return [{"step": p["step"], "acc": p["acc"]} for p in curve], sum(r["time/step_s"] for r in rows) / budget.steps


def report(runs: dict, seeds: list[int], n: int) -> tuple[str, dict]:
    """runs[arm][seed] = (curve, s/step) -> (markdown tables and verdict, JSON fields)."""
    arms = list(runs)
    steps = [p["step"] for p in runs[arms[0]][seeds[0]][0]]
    mean_curve = {a: [statistics.fmean(runs[a][s][0][i]["acc"] for s in seeds) for i in range(len(steps))]
                  for a in arms}
    lines = [f"Mean held-out greedy accuracy over {len(seeds)} seed(s):", "",
             "| step | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    lines += [f"| {st} | " + " | ".join(f"{mean_curve[a][i]:.3f}" for a in arms) + " |" for i, st in enumerate(steps)]
    lines.append("| s / step | " + " | ".join(f"{statistics.fmean(runs[a][s][1] for s in seeds):.3f}"
                                             for a in arms) + " |")
    fields: dict = {"eval_steps": steps}
    for a in arms:
        ends = [runs[a][s][0][-1]["acc"] for s in seeds]
        fields.update({f"{a}_acc_end": statistics.fmean(ends), f"{a}_acc_end_per_seed": ends,
                       f"{a}_acc_best": statistics.fmean(max(p["acc"] for p in runs[a][s][0]) for s in seeds),
                       f"{a}_s_per_step": round(statistics.fmean(runs[a][s][1] for s in seeds), 4),
                       f"{a}_curve": mean_curve[a], f"{a}_curves": [[p["acc"] for p in runs[a][s][0]] for s in seeds]})
    claim = None
    if {"trainer", "supervised"} <= set(arms):
        claim = learning_claim([(runs["trainer"][s][0][-1]["acc"], runs["supervised"][s][0][-1]["acc"])
                                for s in seeds], n)
        lines += ["", f"End of training, per seed (n = {n} held-out prompts):", "",
                  "| seed | " + " | ".join(arms) + f" | d = trainer - supervised | {Z:g} se | d > {Z:g} se |",
                  "|---" * (len(arms) + 4) + "|"]
        for s, row in zip(seeds, claim["rows"]):
            lines.append(f"| {s} | " + " | ".join(f"{runs[a][s][0][-1]['acc']:.3f}" for a in arms)
                         + f" | {row['d']:+.3f} | {Z * row['se']:.3f} | {'yes' if row['beats'] else 'no'} |")
        verdict = "holds" if claim["holds"] else "does not hold"
        lines += ["", f"**RL beats the supervised control: {verdict}** ({claim['why']}; mean d over seeds "
                  f"{claim['mean_d']:+.3f}).", "", f"Rule: {RULE}."]
    else:
        lines += ["", "The claim rule needs the trainer and supervised arms; not evaluated."]
    fields["claim"] = claim
    return "\n".join(lines), fields


def plot(fields: dict, path: Path, title: str) -> None:
    """Held-out greedy accuracy vs step, one line per arm and seed (the JSON fields `eval_steps`, `<arm>_curves`)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for i, arm in enumerate(fields["arms"]):
        for j, curve in enumerate(fields[f"{arm}_curves"]):
            ax.plot(fields["eval_steps"], [100 * a for a in curve], color=f"C{i}", marker="o", markersize=3,
                    alpha=0.8, label=arm if j == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other --section.key=value arguments override the config.")
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="steps per arm (default: train.steps)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=None, help="every arm's lr (default: train.lr)")
    parser.add_argument("--seeds", type=int, default=1, help="K: each arm runs once per seed --seed .. --seed+K-1")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: train.seed)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--sft-batch", type=int, default=SFT_BATCH, help="traces per supervised step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/rl_crosscheck"))
    args, extra = parser.parse_known_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(set(arms) - set(ARMS))} or empty; choose from {list(ARMS)}")
    arms = [a for a in ARMS if a in arms]  # one fixed column order
    cfg = load_config(args.config, extra)
    if cfg.data.task not in BUILTIN_TASKS:
        parser.error(f"--config: data.task must be one of {BUILTIN_TASKS} (the independent loop builds the task's "
                     f"splits itself), got {cfg.data.task!r}")
    reward = get_reward(cfg.data.reward)
    if isinstance(reward, RewardSum):  # a batch reward term needs dash's RewardScorer
        parser.error(f"--config: data.reward={cfg.data.reward!r} must be per-sample rewards only (fn(text, answer))")
    steps = cfg.train.steps if args.steps is None else args.steps
    lr = cfg.train.lr if args.lr is None else args.lr
    if steps < 1 or args.eval_every < 1 or args.seeds < 1 or args.sft_batch < 1 or not lr > 0:
        parser.error(f"need --steps, --eval-every, --seeds, --sft-batch >= 1 and --lr > 0, got steps={steps}, "
                     f"eval_every={args.eval_every}, seeds={args.seeds}, sft_batch={args.sft_batch}, lr={lr}")
    torch.set_num_threads(args.threads)
    budget = Budget(steps=steps, eval_every=args.eval_every, lr=lr, prompts=cfg.train.prompts_per_step,
                    group=cfg.train.group_size, max_new=cfg.sampling.max_new_tokens,
                    eval_max_new=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens, sft_batch=args.sft_batch)
    folder = resolve_model_path(cfg.model.path)  # the trainer's warm start
    _, *splits = builtin_task(cfg.data)  # the trainer's own train / held-out split
    first = cfg.train.seed if args.seed is None else args.seed
    seeds = list(range(first, first + args.seeds))
    runs: dict = {a: {} for a in arms}
    t0 = time.perf_counter()  # progress messages only
    for seed in seeds:  # seed-major: the progress lines show each seed's arms together
        for arm in arms:
            print(f"[{time.perf_counter() - t0:6.0f} s] {arm} seed {seed} ({steps} steps)", file=sys.stderr, flush=True)
            runs[arm][seed] = (run_trainer(cfg, budget, seed) if arm == "trainer" else
                               run_independent(folder, splits, reward, budget, seed, supervised=arm == "supervised"))
    body, fields = report(runs, seeds, len(splits[1]))
    fields = {"config": Path(args.config).name, "task": cfg.data.task, "steps": steps, "lr": lr, "seeds": seeds,
              "arms": arms, "prompts_per_step": budget.prompts, "group_size": budget.group,
              "max_new_tokens": budget.max_new, "sft_batch": budget.sft_batch, "eval_prompts": len(splits[1]),
              "acc_start": runs[arms[0]][seeds[0]][0][0]["acc"], "threads": torch.get_num_threads(),
              "overrides": extra, **fields}
    config = Path(args.config).resolve()
    config = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    command = " ".join([f"python benchmarks/rl_crosscheck.py --config {config} --steps {steps} --lr {lr}",
                        f"--seeds {args.seeds} --seed {first} --arms {','.join(arms)}", *extra])
    head = (f"# RL cross-check on {config.name} ({cfg.data.task}; {steps} steps per arm, lr {lr}, seeds {seeds})\n\n"
            f"Produced by `{command}`; held-out greedy accuracy ({len(splits[1])} prompts). RL arms: {budget.prompts} "
            f"prompts x G={budget.group} per step; supervised: {budget.sft_batch} traces per step.\n\n")
    out = Path(args.out)
    png = (out.parent / f"{out.name}.png").resolve()
    fields["png"] = str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    emit(body, result("rl_crosscheck", "cpu", **fields), out, heading=head + f"![curves]({out.name}.png)\n\n")
    plot(fields, png, f"{cfg.data.task}: {', '.join(arms)}; lr {lr}, seeds {seeds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
