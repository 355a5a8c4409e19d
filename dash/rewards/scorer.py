"""Score a batch of completions with any reward: per-sample terms once per completion, TRL-form terms once per batch.

Purpose: the sampler hands over one step's completions at once; a reward spec may mix per-sample functions
(`fn(completion, answer)`, the built-ins) with TRL-form functions (`fn(prompts, completions, **columns)`, see
dash/rewards/user.py). `RewardScorer` calls each the way it expects, sums the terms with weight 1 and keeps the guards
of dash/rewards/safe_call.py for every call:
- per-sample terms are summed inside one guarded call per completion (as `get_reward("a+b")` always did: a term that
  raises zeroes that completion's sum);
- each TRL-form term is one guarded call per batch (the timeout covers the whole call): if it raises or times out,
  each of its samples scores 0 for that term and is counted; a result that is not a list of one value per completion
  is an error counted per sample; None scores 0 and is counted in `no_reward`; a non-number, NaN, inf or a value
  beyond +-MAX_ABS_REWARD scores 0 and is counted as invalid. The run never stops for a reward.

All terms share one `RewardStats` (`scorer.stats`). Departures from TRL: TRL keeps None as NaN and sums terms with
nansum, which is the same as scoring 0 here; TRL's `trainer_state` is not passed.

Run the tests: `python -m pytest tests/rewards/test_user_reward.py -q`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dash.rewards.safe_call import DEFAULT_TIMEOUT_S, RewardStats, SafeReward
from dash.rewards.user import EXCLUDED_COLUMNS, LoadedReward, describe, example_columns


@dataclass(frozen=True, slots=True)
class RewardSum:
    """What `get_reward(spec)` gives when a term is in TRL form (otherwise it gives a plain per-sample function).

    Attributes:
        per_sample: the sum of the per-sample terms, `fn(completion, answer) -> float`; None if there are none.
        batch: the TRL-form terms, each called once per batch.
        name: the spec, e.g. "math+rewards.py:brevity".
    """

    per_sample: Callable[[str, str], float] | None
    batch: tuple[LoadedReward, ...]
    name: str


def _as_list(value: Any) -> list | None:
    """A batch reward's result as a list (list, tuple, 1-D numpy array or tensor), or None if it is not one."""
    if isinstance(value, (list, tuple)):
        return list(value)
    tolist = getattr(value, "tolist", None)  # numpy / torch: a 0-d array gives a scalar, which is not a list
    if callable(tolist) and getattr(value, "ndim", None) == 1:
        return tolist()
    return None


class RewardScorer:
    """A `RewardSum` or any reward function (form told from its signature), guarded and counted. A reward spec
    (a name, `file.py:function`, `a+b`) is resolved by the caller with `dash.rewards.get_reward`, which imports this
    module."""

    def __init__(self, reward: RewardSum | Callable, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 mode: Literal["auto", "thread"] = "auto") -> None:
        if isinstance(reward, str):
            raise TypeError(f"RewardScorer takes a reward function or RewardSum, not the spec {reward!r}: pass "
                            f"dash.rewards.get_reward({reward!r})")
        if isinstance(reward, RewardSum):
            per_sample, batch = reward.per_sample, reward.batch
        else:
            loaded = describe(reward, f"reward {getattr(reward, '__name__', type(reward).__name__)}")
            per_sample, batch = (reward, ()) if loaded.form == "sample" else (None, (loaded,))
        self.stats = RewardStats()
        self._per_sample = SafeReward(per_sample, timeout_s=timeout_s, mode=mode) if per_sample else None
        self._batch = [(term, SafeReward(term.fn, timeout_s=timeout_s, mode=mode, name=term.name)) for term in batch]
        for safe in self._guards():
            safe.stats = self.stats  # one set of counters for the whole reward

    def _guards(self) -> list[SafeReward]:
        return ([self._per_sample] if self._per_sample else []) + [safe for _, safe in self._batch]

    def score_batch(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str],
                    columns: Sequence[Mapping[str, Any]], completion_ids: Sequence[Sequence[int]] | None = None
                    ) -> list[float]:
        """Rewards of aligned lists, one entry per completion: `columns[i]` are the dataset fields of completion i's
        row (`dash.rewards.user.example_columns`), `answers[i]` its parsed gold answer. -> [n] floats."""
        n = len(completions)
        if not len(prompts) == len(answers) == len(columns) == n or (completion_ids is not None
                                                                       and len(completion_ids) != n):
            raise ValueError(f"score_batch: {n} completions but {len(prompts)} prompts, {len(answers)} answers, "
                             f"{len(columns)} rows")
        totals = [self._per_sample(c, a) for c, a in zip(completions, answers)] if self._per_sample else [0.0] * n
        for term, safe in self._batch:
            for i, r in enumerate(self._call_batch(term, safe, prompts, completions, columns, completion_ids)):
                totals[i] += r
        return totals

    def score(self, completion: str, answer: str, example: Any = None) -> float:
        """One completion's reward; `example` (with .prompt and the row's fields) feeds a TRL-form term."""
        columns = example_columns(example) if example is not None else {"answer": answer}
        prompt = getattr(example, "prompt", "")
        return self.score_batch([prompt], [completion], [answer], [columns])[0]

    def _call_batch(self, term: LoadedReward, safe: SafeReward, prompts, completions, columns, completion_ids):
        n = len(completions)
        names: dict[str, None] = {}  # every row's field names, in order of first appearance
        for row in columns:
            names.update(dict.fromkeys(k for k in row if k not in EXCLUDED_COLUMNS))
        kwargs = {"prompts": list(prompts), "completions": list(completions),
                  **({"completion_ids": [list(ids) for ids in completion_ids]} if completion_ids is not None else {}),
                  **{k: [row.get(k) for row in columns] for k in names}}
        if term.accepts is not None:  # no **kwargs: pass only what it names (TRL would fail on the others)
            kwargs = {k: v for k, v in kwargs.items() if k in term.accepts}
        ok, value = safe.guarded(n, **kwargs)
        if not ok:
            return [0.0] * n
        values = _as_list(value)
        if values is None or len(values) != n:
            got = f"{len(values)} values" if values is not None else f"a {type(value).__name__}"
            self.stats.note("errors", f"{term.name} returned {got}, not a list of {n} rewards", n)
            return [0.0] * n
        out = []
        for v in values:
            if v is None:  # TRL: "no reward from this function for this sample"
                self.stats.no_reward += 1
                out.append(0.0)
            else:
                out.append(safe.check_value(v))
        return out


__all__ = ["RewardScorer", "RewardSum"]
