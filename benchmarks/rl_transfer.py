"""Why RL gains only ~5 points on the tiny task: headroom of the warm start, and whether learning transfers.

    python benchmarks/rl_transfer.py              # ~3 minutes on 1 thread

Three measurements from the shipped SFT warm start with configs/tiny.yaml:
  1. headroom: held-out greedy accuracy, sampled pass@1 and pass@k (k = 16, temperature 1): how often a correct
     answer is among the samples RL sees;
  2. memorisation: DASH on ONE fixed batch of 64 training prompts for `--steps` steps (fresh samples every step): the
     training reward on those prompts;
  3. transfer: the same run on fresh prompts every step (the normal loop): the training reward on new prompts;
  4. which digits: held-out greedy accuracy per answer length and, among answers of the right length, per digit
     position (most significant first), before and after run (3): what RL improves and what it cannot.
If (2) climbs while (3) stays flat, the loop optimises what it sees and what it learns does not carry to other
problems: the limit is the task / model, not the gradient. Prints a table, then one JSON line; writes <out>.md/.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import emit, result  # noqa: E402
from trainer_runs import quiet_trainer  # noqa: E402

from dash.config import load_config  # noqa: E402
from dash.rl.eval_sets import load_eval_sets  # noqa: E402
from dash.rl.evaluate import evaluate_sets  # noqa: E402
from dash.runtime import resolve_device  # noqa: E402
from dash.tokenizer import EOS_TOKEN  # noqa: E402

PASS_K = 16
WINDOW = 10  # steps averaged at the start and the end of a run (one step's reward has SE ~0.03 at 256 samples)


def make_trainer(config: str, overrides: list[str]):
    return quiet_trainer(load_config(config, overrides), "dash-transfer-")


def digit_accuracy(trainer) -> dict:
    """Held-out greedy answers by answer length L: {L: {"n", "acc", "digits"}}, where digits[j] is how often digit j
    (most significant first) is right among the answers that have the right number of digits."""
    examples = trainer.test_examples
    out = trainer.sampler.generate([e.prompt for e in examples], 1, list(range(len(examples))), temperature=0.0)
    stats: dict = {}
    for e, req in zip(examples, out, strict=True):
        got = req.completions[0].text.partition(EOS_TOKEN)[0]
        s = stats.setdefault(len(e.answer), {"n": 0, "right": 0, "same_len": 0, "digit_right": [0] * len(e.answer)})
        s["n"] += 1
        s["right"] += got == e.answer
        if len(got) == len(e.answer):
            s["same_len"] += 1
            for j, (a, b) in enumerate(zip(got, e.answer)):
                s["digit_right"][j] += a == b
    return {L: {"n": s["n"], "acc": s["right"] / s["n"],
                "digits": [round(c / max(s["same_len"], 1), 3) for c in s["digit_right"]]}
            for L, s in sorted(stats.items())}


def reward_curve(config: str, overrides: list[str], steps: int, fixed: bool) -> tuple[list[float], dict]:
    """Training reward of every step, and digit_accuracy after the last step."""
    trainer = make_trainer(config, overrides)
    try:
        if fixed:  # the same prompts every step; the sampling seeds still change with the step
            batch = trainer.train_data.next_batch(trainer.cfg.train.prompts_per_step)
            trainer.train_data.next_batch = lambda n: batch
        curve = [trainer.train_step()["rollout/reward_mean"] for _ in range(steps)]
        return curve, digit_accuracy(trainer)
    finally:
        trainer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/rl_transfer"))
    args, overrides = parser.parse_known_args()
    if args.steps < 2 * WINDOW:
        parser.error(f"--steps must be >= {2 * WINDOW} (start and end windows of {WINDOW} steps)")
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)

    trainer = make_trainer(args.config, overrides)
    try:
        s = trainer.cfg.sampling  # pass@k at the training sampler's settings (T=1), plus the greedy pass
        cfg = dataclasses.replace(trainer.cfg, eval=dataclasses.replace(
            trainer.cfg.eval, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, n=PASS_K, k=[1, PASS_K],
            greedy=True, sets={}, select=""))
        sets = load_eval_sets(cfg, trainer.tokenizer, trainer.model, trainer.test_examples)
        with torch.no_grad():
            head, _ = evaluate_sets(sets, cfg.eval, cfg.train.seed)
        digits_before = digit_accuracy(trainer)
    finally:
        trainer.close()
    fixed, _ = reward_curve(args.config, overrides, args.steps, fixed=True)
    fresh, digits_after = reward_curve(args.config, overrides, args.steps, fixed=False)
    ends = lambda c: (statistics.fmean(c[:WINDOW]), statistics.fmean(c[-WINDOW:]))  # noqa: E731
    rows = [
        ("held-out greedy accuracy", f"{head['eval/heldout/greedy_acc']:.3f}"),
        ("held-out sampled pass@1 (T=1)", f"{head['eval/heldout/pass@1']:.3f}"),
        (f"held-out pass@{PASS_K} (T=1)", f"{head[f'eval/heldout/pass@{PASS_K}']:.3f}"),
        (f"training reward, one fixed batch: first {WINDOW} -> last {WINDOW} steps",
         "{:.3f} -> {:.3f}".format(*ends(fixed))),
        (f"training reward, fresh prompts: first {WINDOW} -> last {WINDOW} steps",
         "{:.3f} -> {:.3f}".format(*ends(fresh))),
    ]
    for L, before in digits_before.items():
        after = digits_after[L]
        rows.append((f"{L}-digit answers ({before['n']} prompts): greedy accuracy; per digit, most significant first, "
                     f"before -> after the fresh-prompt run",
                     f"{before['acc']:.3f} -> {after['acc']:.3f}; " + ", ".join(
                         f"{b:.2f} -> {a:.2f}" for b, a in zip(before["digits"], after["digits"]))))
    table = ["| measurement | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    device = resolve_device(trainer.cfg.model.device).type
    record = result("rl_transfer", device, steps=args.steps, greedy_acc=head["eval/heldout/greedy_acc"],
                    pass1_sampled=head["eval/heldout/pass@1"], **{f"pass{PASS_K}": head[f"eval/heldout/pass@{PASS_K}"]},
                    fixed_reward_start=ends(fixed)[0], fixed_reward_end=ends(fixed)[1],
                    fresh_reward_start=ends(fresh)[0], fresh_reward_end=ends(fresh)[1],
                    fixed_curve=fixed, fresh_curve=fresh, digits_before=digits_before,
                    digits_after=digits_after, overrides=overrides, threads=torch.get_num_threads())
    emit("\n".join(table), record, args.out,
         heading=f"# RL headroom and transfer on the tiny task ({args.steps} DASH steps, configs/tiny.yaml)\n\n"
                 "Produced by `python benchmarks/rl_transfer.py`.\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
