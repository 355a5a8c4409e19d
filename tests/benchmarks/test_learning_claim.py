"""The claim rule of benchmarks/learning_claim.py on made-up numbers: it holds only with >= 3 seeds and d > 2 se on
every seed, strictly (d == 2 se fails).

The boundary case uses p1 = 0.75, p2 = 0.25, n = 6, where every quantity is exact in binary floating point:
p(1-p)/n = 3/16/6 = 1/32 for both, se = sqrt(1/16) = 0.25, so d = 0.5 is exactly 2 se.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from learning_claim import MIN_SEEDS, diff_se, learning_claim  # noqa: E402


def test_se_is_the_binomial_standard_error_of_the_difference():
    assert diff_se(0.75, 0.25, 6) == 0.25  # exact, see the module docstring
    assert diff_se(0.5, 0.5, 100) == pytest.approx((0.25 / 100 * 2) ** 0.5, rel=1e-15)
    assert diff_se(1.0, 0.0, 10) == 0.0


def test_holds_when_every_seed_beats_by_more_than_two_se():
    claim = learning_claim([(0.75, 0.25)] * 3, n=7)  # se = sqrt(3/8 / 7) = 0.231, 2 se = 0.463 < 0.5
    assert claim["holds"] and claim["seeds"] == 3 and claim["mean_d"] == 0.5
    assert all(r["beats"] for r in claim["rows"])


def test_fails_at_the_boundary_d_equal_to_two_se():
    claim = learning_claim([(0.75, 0.25)] * 3, n=6)  # d = 0.5 = 2 se exactly: "more than" two se fails
    assert claim["rows"][0]["d"] == 2 * claim["rows"][0]["se"]
    assert not claim["holds"] and not any(r["beats"] for r in claim["rows"])
    assert "0 of 3" in claim["why"]


def test_fails_when_one_seed_does_not_beat_even_if_the_mean_does():
    claim = learning_claim([(0.75, 0.25), (0.75, 0.25), (0.40, 0.30)], n=7)
    assert claim["mean_d"] == pytest.approx((0.5 + 0.5 + 0.1) / 3)
    assert [r["beats"] for r in claim["rows"]] == [True, True, False]
    assert not claim["holds"] and "2 of 3" in claim["why"]


@pytest.mark.parametrize("k", [1, MIN_SEEDS - 1])
def test_fails_with_fewer_than_three_seeds_however_large_d(k):
    claim = learning_claim([(0.9, 0.1)] * k, n=500)
    assert all(r["beats"] for r in claim["rows"])
    assert not claim["holds"] and f"only {k} seed" in claim["why"]


def test_rl_below_the_control_never_holds():
    assert not learning_claim([(0.25, 0.75)] * 5, n=1000)["holds"]


@pytest.mark.parametrize("pairs, n, match", [([(1.2, 0.5)], 10, r"seed 0's accuracies must be in \[0, 1\]"),
                                             ([(0.5, 0.5)], 0, r"n \(held-out prompts\) must be >= 1")])
def test_bad_input_is_a_clear_error(pairs, n, match):
    with pytest.raises(ValueError, match=match):
        learning_claim(pairs, n)
