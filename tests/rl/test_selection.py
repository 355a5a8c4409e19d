"""The sample-selection rules (dash/rl/selection.py), each against its defining property.

PODS keeps the m of n rewards with the largest variance (checked against every subset); GRESO's skipped prompts never
reach the sampler and its state resumes exactly; DPPO's re-weighted gradient has the full batch's expectation (the
mean over seeded draws within 4 standard errors); dash_filter trains bitwise as the code before the rule existed.
"""

from __future__ import annotations

import itertools
import json
import statistics

import pytest
import torch

from dash.config import ConfigError, load_config
from dash.rewards import register_reward
from dash.rl import phases
from dash.rl.rollout import group_advantages, keep_mask, zero_non_finite
from dash.rl.selection import (
    SampleSelector,
    dppo,
    dppo_keep_probability,
    max_variance_subset,
    pods,
    prompt_key,
)
from dash.rl.trainer import Trainer
from dash_kernels.reference import policy_loss
from tests.tiny_models import save_tiny_dash_model

SE_BOUND = 4.0  # |mean - expected| <= 4 standard errors: a false alarm has probability ~6e-5 per element
DRAWS = 20_000  # seeded DPPO draws averaged


def _even_length(completion: str, answer: str) -> float:
    return float(len(completion) % 2 == 0)


register_reward("test_sel_even_length", _even_length)
register_reward("test_sel_constant", lambda completion, answer: 1.0)


# -- PODS -------------------------------------------------------------------------------------------------------
def _population_var(values) -> float:
    return statistics.pvariance([float(v) for v in values])


@pytest.mark.parametrize("kind", ["binary", "three_level", "continuous"])
def test_pods_keeps_the_max_variance_subset_vs_brute_force(kind):
    gen = torch.Generator().manual_seed(0)
    for n in range(2, 9):
        for m in range(2, n + 1):
            if kind == "binary":
                r = torch.randint(0, 2, (12, n), generator=gen).float()
            elif kind == "three_level":
                r = torch.randint(0, 3, (12, n), generator=gen).float() / 2
            else:
                r = torch.randn(12, n, generator=gen)
            keep = max_variance_subset(r, m)  # [12, n]
            assert keep.sum(1).tolist() == [m] * 12
            for row, k in zip(r, keep):
                best = max(_population_var(c) for c in itertools.combinations(row.tolist(), m))
                assert _population_var(row[k].tolist()) == pytest.approx(best, abs=1e-9), (kind, n, m, row, k)


def test_pods_normalises_advantages_over_the_kept_samples():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5])  # 3 groups of 4
    sel = pods(rewards, group_size=4, m=2)
    keep = sel.keep.view(3, 4)
    assert keep.sum(1).tolist() == [2, 2, 2]
    assert keep[0, 0] and rewards.view(3, 4)[2][keep[2]].tolist() in ([1.0, 0.0], [0.0, 1.0])
    expected = torch.zeros(3, 4)
    for g in range(3):
        expected[g, keep[g]] = group_advantages(rewards.view(3, 4)[g][keep[g]], 2)
    assert torch.equal(sel.advantages, expected.view(-1))
    assert torch.all(sel.advantages[~sel.keep] == 0)


# -- DPPO -------------------------------------------------------------------------------------------------------
def _loss_grad(logp, old, adv, mask, normalizer):
    x = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(x, old, adv, mask, loss_type="dr_grpo", normalizer=normalizer, eps_low=0.2, eps_high=0.2)
    loss.backward()
    return x.grad


def _policy_batch():
    """8 samples (2 groups of 4) x 6 tokens, ratios far enough from 1 that PPO's clip is active on some tokens."""
    gen = torch.Generator().manual_seed(3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0])
    adv = zero_non_finite(group_advantages(rewards, 4))[0]  # [8], includes |A| < 1 (pruned at random)
    logp = -torch.rand(8, 6, generator=gen) * 3  # [B, L]
    old = logp + 0.5 * torch.randn(8, 6, generator=gen)  # ratio exp(logp - old): many outside [0.8, 1.2]
    mask = torch.ones(8, 6)
    mask[2, 4:] = 0  # ragged lengths
    return logp, old, adv, mask, 8.0 * 6  # dr_grpo's global normaliser: all samples x max length


def test_scaling_the_advantage_scales_the_clipped_loss_gradient():
    """The claim DPPO's 1/p rests on: -min(r cA, clip(r) cA) = c * -min(r A, clip(r) A) for c > 0, clip included."""
    logp, old, adv, mask, norm = _policy_batch()
    ratio = torch.exp(logp - old)
    assert ((ratio < 0.8) | (ratio > 1.2)).float().mean() > 0.2  # the clip is really exercised
    scale = torch.tensor([1.0, 2.5, 1.7, 4.0, 1.0, 1.25, 3.0, 1.0])
    scaled = _loss_grad(logp, old, adv * scale, mask, norm)
    assert torch.allclose(scaled, _loss_grad(logp, old, adv, mask, norm) * scale[:, None], rtol=1e-6, atol=1e-9)


def test_dppo_reweighted_gradient_is_unbiased():
    logp, old, adv, mask, norm = _policy_batch()
    B, L = logp.shape
    p = dppo_keep_probability(adv, min_keep=0.2, adv_scale=1.0)
    assert 0 < (p < 1).sum() < len(p)  # some samples are pruned at random, some always kept
    full = _loss_grad(logp, old, adv, mask, norm)  # [B, L]
    u = torch.rand(DRAWS, B, generator=torch.Generator().manual_seed(11))  # [DRAWS, B]
    sels = [dppo(adv, p, u[d]) for d in range(DRAWS)]
    keep = torch.stack([s.keep for s in sels])  # [DRAWS, B]
    weighted = torch.stack([s.advantages for s in sels])  # [DRAWS, B]
    kept_mask = mask * keep[..., None]  # [DRAWS, B, L]: a pruned sample is in no micro-batch; the normaliser stays

    def per_draw_grads(advantages):  # dr_grpo with a fixed normaliser is a sum over samples: one backward gives
        stacked = lambda t: t.expand(DRAWS, B, L).reshape(DRAWS * B, L)  # noqa: E731 -- every draw's gradient
        g = _loss_grad(stacked(logp), stacked(old), advantages.reshape(-1), kept_mask.reshape(DRAWS * B, L), norm)
        return g.view(DRAWS, B, L)

    g = per_draw_grads(weighted)
    mean, se = g.mean(0), g.std(0) / DRAWS**0.5
    assert torch.all((mean - full).abs() <= SE_BOUND * se + 1e-7), (mean - full).abs().max()
    # The test can fail: the same draws without the 1/p weights miss the full gradient by far more than 4 SE.
    n = per_draw_grads(adv.expand(DRAWS, B) * keep)
    assert ((n.mean(0) - full).abs() > SE_BOUND * n.std(0) / DRAWS**0.5 + 1e-7).any()


# -- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, match", [
    (["--loss.selection.rule=pods", "--loss.selection.pods_keep=5"], "pods_keep=5 must be <= train.group_size=4"),
    (["--loss.selection.pods_keep=1"], "pods_keep must be >= 2"),
    (["--loss.selection.rule=dppo", "--loss.beta=0.04"], "rule=dppo needs loss.normalizer=global and loss.beta=0"),
    (["--loss.selection.rule=dppo", "--loss.normalizer=paper"], "rule=dppo needs loss.normalizer=global"),
    (["--loss.selection.greso_max_skip=1"], "greso_base_skip <= greso_max_skip < 1"),
    (["--loss.selection.greso_base_skip=0.95"], "greso_base_skip <= greso_max_skip < 1"),
    (["--loss.selection.dppo_min_keep=0"], r"dppo_min_keep must be in \(0, 1\]"),
    (["--loss.selection.dppo_adv_scale=-1"], "dppo_adv_scale must be > 0"),
    (["--loss.selection.rule=cppo"], "loss.selection.rule: 'cppo' is not one of"),
])
def test_bad_selection_settings_name_the_key_and_limit(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_greso_skip_probability_grows_with_the_streak_up_to_the_cap():
    cfg = load_config(None, ["--loss.selection.rule=greso", "--loss.selection.greso_base_skip=0.5",
                             "--loss.selection.greso_max_skip=0.8"])
    sel = SampleSelector(cfg)
    sel.streaks = {"a": 1, "b": 2, "c": 5}
    assert [sel.skip_probability(k) for k in ("new", "a", "b", "c")] == [0.0, 0.5, 0.75, 0.8]


# -- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_dash_model(tmp_path_factory.mktemp("tiny-random") / "model", seed=1)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """8 prompts: with 8 prompts a step, every step is one epoch and every prompt comes back each step."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a:02d}+{a + 1:02d}*{a + 2:02d}=",
                                        "answer": str(a + (a + 1) * (a + 2))}) + "\n" for a in range(8)))
    return path


def _cfg(model_dir, out_dir, *extra):
    return load_config(None, [
        f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=16", "--data.reward=test_sel_even_length",
        "--sampling.max_new_tokens=6", "--train.prompts_per_step=8", "--train.group_size=4",
        "--train.micro_batch_size=8", "--train.steps=4", "--train.lr=1e-3", "--train.lr_schedule=linear",
        "--log.eval_every=0", f"--log.out_dir={out_dir}", *extra])


def _greso_cfg(model_dir, data_file, out_dir, reward, *extra):
    return _cfg(model_dir, out_dir, "--data.task=jsonl", f"--data.train_path={data_file}",
                f"--data.test_path={data_file}", f"--data.reward={reward}", "--loss.selection.rule=greso",
                "--loss.selection.greso_base_skip=0.6", "--loss.selection.greso_max_skip=0.9", *extra)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _old_gradient_filter(cfg, rollout, step, first_sample=0):
    """gradient_filter as it was before loss.selection existed, verbatim: the reference dash_filter must equal."""
    adv, non_finite = zero_non_finite(group_advantages(rollout.rewards, cfg.train.group_size))  # [S]
    filtering = cfg.train.algorithm == "dash" and cfg.loss.gradient_filtering
    keep = keep_mask(adv, cfg.loss.adv_threshold if filtering else None)  # [S]
    keep &= torch.tensor([len(c) > 0 for c in rollout.completion_ids])
    return phases.Filtered(adv, keep, non_finite)


def _two_steps(cfg, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr("dash.rl.step.gradient_filter", _old_gradient_filter)
    tr = Trainer(cfg, quiet=True)
    tr.setup()
    try:
        history = [tr.train_step() for _ in range(2)]
        return _weights(tr.model), history
    finally:
        tr.close()
        if monkeypatch is not None:
            monkeypatch.undo()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dash", "grpo"])
def test_dash_filter_trains_bitwise_as_before(model_dir, tmp_path, monkeypatch, algorithm):
    old_w, old_h = _two_steps(_cfg(model_dir, tmp_path / "old", f"--train.algorithm={algorithm}"), monkeypatch)
    new_w, new_h = _two_steps(_cfg(model_dir, tmp_path / "new", f"--train.algorithm={algorithm}",
                                   "--loss.selection.rule=dash_filter"))
    for k in old_w:
        assert torch.equal(old_w[k], new_w[k]), k
    for old, new in zip(old_h, new_h):
        untimed = lambda h: {k: v for k, v in h.items() if not k.startswith("time/")}  # noqa: E731
        assert untimed(old) == untimed(new)  # losses, grad norms, counts
        assert old["rollout/kept_frac"] == new["rollout/kept_frac"] == new["select/kept_frac"]
        assert new["select/skipped_prompts"] == 0
    assert any(h["train/micro_batches"] > 0 for h in new_h)  # an update happened, so the comparison means something


@pytest.mark.slow
def test_greso_skipped_prompts_never_reach_the_sampler(model_dir, data_file, tmp_path):
    tr = Trainer(_greso_cfg(model_dir, data_file, tmp_path, "test_sel_constant"), quiet=True)
    tr.setup()
    sampled, decided = [], []
    real_sample, real_skip = tr.sampler.sample, tr.selector.before_rollout

    def spy_sample(examples, *args, **kwargs):
        sampled.append([e.prompt for e in examples])
        return real_sample(examples, *args, **kwargs)

    def spy_skip(examples, *args, **kwargs):
        kept, skipped = real_skip(examples, *args, **kwargs)
        decided.append(({e.prompt for e in examples} - {e.prompt for e in kept}, len(kept)))
        return kept, skipped

    tr.sampler.sample, tr.selector.before_rollout = spy_sample, spy_skip
    try:
        history = [tr.train_step() for _ in range(4)]
    finally:
        tr.close()
    assert [len(s) for s in sampled] == [n for _, n in decided]  # DASH: one sampling call a step
    for (skipped, _), prompts, m in zip(decided, sampled, history):
        assert not skipped & set(prompts)  # a skipped prompt is never generated
        assert m["select/skipped_prompts"] == len(skipped)
    # A constant reward: every group has zero variance, so from step 2 on prompts are skipped (p >= 0.6 each).
    assert decided[0][0] == set() and sum(len(s) for s, _ in decided[1:]) > 0
    assert all(v >= 1 for v in tr.selector.streaks.values())


@pytest.mark.slow
def test_greso_state_resumes_exactly(model_dir, data_file, tmp_path):
    straight = Trainer(_greso_cfg(model_dir, data_file, tmp_path / "a", "test_sel_even_length"), quiet=True)
    straight.setup()
    skipped = [straight.train_step()["select/skipped_prompts"] for _ in range(4)]
    expected, streaks = _weights(straight.model), dict(straight.selector.streaks)
    straight.close()
    assert sum(skipped) > 0 and streaks  # the state matters for the steps after the checkpoint

    first = Trainer(_greso_cfg(model_dir, data_file, tmp_path / "b", "test_sel_even_length"), quiet=True)
    first.setup()
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    first.close()
    second = Trainer(_greso_cfg(model_dir, data_file, tmp_path / "b", "test_sel_even_length"), quiet=True)
    second.setup(resume=str(tmp_path / "b"))
    resumed = [second.train_step()["select/skipped_prompts"] for _ in range(2)]
    got = _weights(second.model)
    assert second.selector.streaks == streaks and resumed == skipped[2:]
    second.close()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["pods", "dppo", "none"])
def test_each_rule_trains_a_step_and_reports_its_kept_fraction(model_dir, tmp_path, rule):
    tr = Trainer(_cfg(model_dir, tmp_path, f"--loss.selection.rule={rule}"), quiet=True)
    tr.setup()
    try:
        m = tr.train_step()
    finally:
        tr.close()
    S = 8 * 4
    assert m["select/skipped_prompts"] == 0 and m["select/kept_frac"] == m["rollout/kept_frac"]
    if rule == "pods":  # pods_keep = 2 of 4 (less any empty completion, which nothing trains on)
        assert m["train/skipped_samples"] >= S // 2
    if rule == "none":
        assert m["rollout/kept_frac"] == 1.0
    assert m["train/micro_batches"] > 0 and torch.isfinite(torch.tensor(m["loss/value"]))


def test_prompt_keys_are_stable_text_hashes():
    class E:
        prompt = "01+02*03="

    assert prompt_key(E()) == prompt_key(E()) and len(prompt_key(E())) == 16
