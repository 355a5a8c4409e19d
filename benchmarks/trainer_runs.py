"""The training loop with held-out evaluations that train_curve.py, reproduce.py, rl_crosscheck.py and rl_transfer.py
share.

A benchmark trainer logs to a fresh temporary folder and has no eval / checkpoint schedule of its own: the benchmark
decides when to evaluate, and evaluations are kept out of the training seconds it reports.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable

from dash.rl.trainer import Trainer


def quiet_trainer(cfg, prefix: str) -> Trainer:
    """A set-up Trainer for `cfg` whose logs go to a new temporary folder named `prefix*`."""
    cfg = dataclasses.replace(cfg, log=dataclasses.replace(
        cfg.log, out_dir=tempfile.mkdtemp(prefix=prefix), eval_every=0, ckpt_every=0, tensorboard=False),
        eval=dataclasses.replace(cfg.eval, temperature=0.0, n=1, k=[1], greedy=True))  # greedy alone, as committed
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    return trainer


def eval_point(trainer: Trainer, step: int, train_s: float) -> dict:
    """Held-out greedy accuracy and answer length now, tagged with the step and the training seconds so far."""
    ev = trainer.evaluate()
    return {"step": step, "train_s": train_s, "acc": ev["eval/heldout/greedy_acc"], "len": ev["eval/heldout/len_mean"]}


def train_with_evals(trainer: Trainer, steps: int, eval_every: int,
                     on_eval: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict]]:
    """`steps` optimizer steps, evaluating at step 0, every `eval_every` steps and at the end.

    Returns (curve, rows): eval points (after step 0 they also carry that step's training reward) and every step's
    metrics. `on_eval(point)` is called after each evaluation past step 0.
    """
    curve, rows, train_s = [eval_point(trainer, 0, 0.0)], [], 0.0
    for step in range(1, steps + 1):
        rows.append(trainer.train_step())
        train_s += rows[-1]["time/step_s"]
        if step % eval_every == 0 or step == steps:
            curve.append({**eval_point(trainer, step, train_s), "reward": rows[-1]["rollout/reward_mean"]})
            if on_eval:
                on_eval(curve[-1])
    return curve, rows

