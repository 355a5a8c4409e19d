"""SafeReward: a raising, hanging or misbehaving reward scores 0.0, is counted, and never kills the run."""

import fractions
import math
import signal
import sys
import threading
import time

import pytest

from dash.rewards import SafeReward, get_reward


def _raises(c, a):
    raise ValueError("bad regex on weird input")


def _sleeps(c, a):
    time.sleep(5)
    return 1.0


def _swallows_everything(c, a):
    try:
        time.sleep(5)
    except Exception:  # noqa: BLE001 -- a reward that catches broadly must still be stoppable
        return 1.0
    return 1.0


def test_passes_good_values_through():
    safe = SafeReward(lambda c, a: 1.0 if c == a else 0.0)
    assert safe.batch(["a", "b"], ["a", "a"]) == [1.0, 0.0]
    assert SafeReward(lambda c, a: True)("x", "y") == 1.0
    assert safe.stats.calls == 2 and safe.stats.failures == 0


def test_exception_scores_zero_and_is_counted():
    safe = SafeReward(_raises)
    assert safe("x", "y") == 0.0
    assert safe.stats.errors == 1
    assert "ValueError: bad regex" in safe.stats.first_failures[0]
    assert SafeReward(lambda c, a: sys.exit(3))("x", "y") == 0.0  # SystemExit is a failure, not the end of training


def test_keyboard_interrupt_still_stops_the_run():
    def interrupted(c, a):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SafeReward(interrupted)("x", "y")


@pytest.mark.parametrize("value", [None, "1.0", math.nan, math.inf, [1.0], 10**400,  # float() overflows
                                   fractions.Fraction(10**400, 3)])
def test_invalid_return_values(value):
    safe = SafeReward(lambda c, a: value)
    assert safe("x", "y") == 0.0
    assert safe.stats.invalid == 1


@pytest.mark.parametrize("fn", [_sleeps, _swallows_everything])
def test_signal_timeout_in_main_thread(fn):
    safe = SafeReward(fn, timeout_s=0.2)
    start = time.perf_counter()
    assert safe("x", "y") == 0.0
    assert time.perf_counter() - start < 2.0
    assert safe.stats.timeouts == 1 and safe.stats.abandoned_threads == 0
    # The alarm is disarmed and the previous handler is back.
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)


def test_thread_mode_timeout_abandons_the_call():
    safe = SafeReward(_sleeps, timeout_s=0.2, mode="thread")
    assert safe("x", "y") == 0.0
    assert safe.stats.timeouts == 1 and safe.stats.abandoned_threads == 1
    assert SafeReward(_raises, mode="thread")("x", "y") == 0.0


def test_works_from_a_worker_thread():
    safe = SafeReward(_sleeps, timeout_s=0.2)
    out = []
    worker = threading.Thread(target=lambda: out.append(safe("x", "y")))
    worker.start()
    worker.join(5)
    assert out == [0.0] and safe.stats.timeouts == 1 and safe.stats.abandoned_threads == 1


def test_nested_wrappers_do_not_clobber_each_other():
    inner = SafeReward(_sleeps, timeout_s=0.2)
    outer = SafeReward(inner, timeout_s=3.0)
    assert outer("x", "y") == 0.0
    assert inner.stats.timeouts == 1 and outer.stats.timeouts == 0


def test_metrics_and_reset():
    safe = SafeReward(_raises, name="math")
    safe("x", "y")
    metrics = safe.stats.metrics()
    assert metrics["reward/errors"] == 1.0 and metrics["reward/calls"] == 1.0
    safe.stats.reset()
    assert safe.stats.calls == 0 and safe.stats.first_failures == []


def test_with_a_real_reward():
    safe = SafeReward(get_reward("math"), timeout_s=5.0)
    assert safe.batch(["\\boxed{2}", "\\boxed{3}", 12345], ["2", "2", "2"]) == [1.0, 0.0, 0.0]
    assert safe.stats.errors == 1  # a non-string completion makes the reward raise; counted, not fatal


def test_bad_arguments():
    with pytest.raises(ValueError):
        SafeReward(_raises, timeout_s=0)
    with pytest.raises(ValueError):
        SafeReward(_raises, mode="process")
    with pytest.raises(ValueError):
        SafeReward(_raises).batch(["a"], [])
