"""Run any reward function with a timeout and an exception guard, so a bad sample never kills the run.

Purpose: the trainer scores thousands of completions per step with code it does not control (a regex on model
output, sympy, a sandboxed program). `SafeReward(fn)` returns `fn(completion, answer)` as a float, or 0.0 when the
call raises, times out or returns something that is not a finite number or is beyond +-MAX_ABS_REWARD; each case is
counted in `RewardStats` (with the first few messages kept for the log) and exposed as slash-named metrics for the
trainer's logger.

How the timeout works (chosen per call):
- `signal` (used when called from the main thread and no other SIGALRM timer or handler is active): an interval
  timer raises `_RewardTimeout` inside the reward. It is a BaseException, so a reward's own `except Exception:`
  cannot swallow it. It interrupts Python code, but not a single long C call (e.g. `10**10**9` on big ints).
- `thread` (any other thread, or `mode="thread"`): the reward runs in a daemon thread that is abandoned after the
  timeout. Python cannot kill a thread, so an abandoned call keeps using CPU until it ends; those are counted in
  `abandoned_threads`. The code reward needs neither: it bounds its own subprocess.

Design limits: KeyboardInterrupt still propagates (a user stopping the run is not a reward failure); SystemExit
from a reward is caught. Departures from the paper: the paper's code calls rewards without a guard.

Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import logging
import math
import numbers
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

# Generous by default: a MATH check with sympy takes milliseconds; anything near this is a hung checker.
DEFAULT_TIMEOUT_S = 10.0
# How many failure messages to keep for the log: enough to see the pattern without flooding it.
MAX_KEPT_FAILURES = 5
# Largest |reward| accepted. Rewards are fp32 (max ~3.4e38) and the group std squares them: a finite 1e308 becomes inf,
# 1e20 overflows the std, and either turns the whole group's advantages into NaN or 0. Verifiable rewards are O(1);
# 1e6 leaves room for any sensible scale while r**2 (1e12) stays far inside fp32's range.
MAX_ABS_REWARD = 1e6


@dataclass(slots=True)
class RewardStats:
    """Counters of one reward function since the last `reset()`.

    Attributes:
        calls: reward calls made (a batch-form call, dash/rewards/scorer.py, is one call for many samples).
        errors: samples whose call raised (scored 0.0); a raising batch call counts each of its samples.
        timeouts: samples whose call was stopped by the timeout (scored 0.0), counted like errors.
        invalid: samples whose reward was a non-number, NaN, inf or a value beyond +-MAX_ABS_REWARD (scored 0.0).
        no_reward: samples a batch-form reward answered None for ("no reward here", TRL's meaning): scored 0.0,
            counted, not a failure.
        abandoned_threads: timed-out thread-mode calls that may still be running.
        seconds: wall time spent in calls.
        first_failures: the first MAX_KEPT_FAILURES failure messages, "kind: message".
    """

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    invalid: int = 0
    no_reward: int = 0
    abandoned_threads: int = 0
    seconds: float = 0.0
    first_failures: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.errors + self.timeouts + self.invalid

    def note(self, kind: Literal["errors", "timeouts", "invalid"], message: str, count: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + count)
        if len(self.first_failures) < MAX_KEPT_FAILURES:
            self.first_failures.append(f"{kind}: {message}")
            logger.warning("reward call failed (%s), scored 0.0: %s", kind, message)

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Scalars for the metrics log, e.g. {"reward/timeouts": 1.0}."""
        names = ("calls", "errors", "timeouts", "invalid", "no_reward", "abandoned_threads", "seconds")
        return {f"{prefix}/{n}": float(getattr(self, n)) for n in names}

    def reset(self) -> None:
        self.calls = self.errors = self.timeouts = self.invalid = self.no_reward = self.abandoned_threads = 0
        self.seconds = 0.0
        self.first_failures = []


class _RewardTimeout(BaseException):
    """Raised inside a reward when its time is up (BaseException: see the module docstring)."""


class SafeReward:
    """`fn(completion, answer) -> float` with a timeout; failures score 0.0 and are counted in `.stats`."""

    def __init__(
        self,
        fn: Callable[[str, str], float],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        mode: Literal["auto", "thread"] = "auto",
        name: str | None = None,
        max_abs: float = MAX_ABS_REWARD,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"SafeReward timeout_s must be > 0, got {timeout_s}")
        if not 0 < max_abs < math.inf:
            raise ValueError(f"SafeReward max_abs must be a finite number > 0, got {max_abs}")
        if mode not in ("auto", "thread"):
            raise ValueError(f"SafeReward mode must be 'auto' or 'thread', got {mode!r}")
        self.fn, self.timeout_s, self.mode, self.max_abs = fn, float(timeout_s), mode, float(max_abs)
        self.name = name or getattr(fn, "__name__", "reward")
        self.stats = RewardStats()

    def __call__(self, completion: str, answer: str) -> float:
        ok, value = self.guarded(1, completion, answer)
        return self.check_value(value) if ok else 0.0

    def guarded(self, samples: int, *args, **kwargs) -> tuple[bool, object]:
        """(True, fn(*args, **kwargs)) under the timeout, or (False, None) after a timeout or an exception, counted
        once per sample the call was scoring (`samples`: 1 here, the batch size for a batch-form reward)."""
        self.stats.calls += 1
        start = time.perf_counter()
        try:
            if self._can_use_signal():
                return True, self._call_with_alarm(*args, **kwargs)
            return True, self._call_in_thread(*args, **kwargs)
        except _RewardTimeout:
            self.stats.note("timeouts", f"{self.name} took longer than {self.timeout_s:g} s", samples)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- the point of this wrapper
            self.stats.note("errors", f"{self.name} raised {type(exc).__name__}: {exc}", samples)
        finally:
            self.stats.seconds += time.perf_counter() - start
        return False, None

    def check_value(self, value: object) -> float:
        """`value` as a float, or 0.0 (counted as invalid) for a non-number, NaN, inf or |value| > max_abs."""
        try:  # float() of a huge int or Fraction raises OverflowError: an invalid reward, not a crash
            score = float(value) if isinstance(value, numbers.Real) else math.nan
        except OverflowError:
            score = math.nan
        if abs(score) <= self.max_abs:  # False for NaN too
            return score
        why = "" if math.isnan(score) or math.isinf(score) else f", beyond the bound +-{self.max_abs:g}"
        self.stats.note("invalid", f"{self.name} returned {value!r:.80}{why}")
        return 0.0

    def batch(self, completions: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Score aligned lists (one answer per completion)."""
        if len(completions) != len(answers):
            raise ValueError(f"batch: {len(completions)} completions but {len(answers)} answers")
        return [self(c, a) for c, a in zip(completions, answers)]

    def _can_use_signal(self) -> bool:
        if self.mode == "thread" or not hasattr(signal, "setitimer"):
            return False
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers can only be installed from the main thread
        # Do not clobber someone else's timer or handler (e.g. an outer SafeReward: the inner one then uses a thread).
        return signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) in (
            signal.SIG_DFL,
            signal.SIG_IGN,
            None,
        )

    def _call_with_alarm(self, *args, **kwargs):
        def on_alarm(signum, frame):
            raise _RewardTimeout()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
            try:
                return self.fn(*args, **kwargs)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)  # one-shot timer: if it already fired, this is a no-op
        finally:
            signal.signal(signal.SIGALRM, previous)

    def _call_in_thread(self, *args, **kwargs):
        box: dict[str, object] = {}

        def run() -> None:
            try:
                box["value"] = self.fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread, which counts it
                box["error"] = exc

        worker = threading.Thread(target=run, name=f"reward-{self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            self.stats.abandoned_threads += 1
            raise _RewardTimeout()
        error = box.get("error")
        if error is not None:
            raise error if isinstance(error, (Exception, SystemExit)) else RuntimeError(repr(error))
        return box.get("value")
