"""Which of a step's samples train, and with what weight: one rule, chosen by `loss.selection.rule`.

    dash_filter  DASH (arXiv 2505.17218): keep |A| > loss.adv_threshold (the default; train.algorithm=grpo or
                 loss.gradient_filtering=false keep every sample, as before)
    pods         PODS (arXiv 2504.13818): of each group's G samples keep the pods_keep whose rewards have the largest
                 variance; the kept samples' advantages are recomputed over the kept subset
    greso        GRESO (arXiv 2506.02177): before generation, skip a prompt whose last z groups all had zero reward
                 variance with probability min(greso_max_skip, 1 - (1 - greso_base_skip)^z); then dash_filter
    dppo         DPPO-style unbiased pruning (arXiv 2603.04135): keep sample i with probability
                 p_i = clamp(|A_i| / dppo_adv_scale, dppo_min_keep, 1) and train it with advantage A_i / p_i, so the
                 policy-gradient's expectation over the draws is the full batch's
    none         keep every sample

Why rescaling the advantage is exact for DPPO: each token's clipped surrogate -min(r A, clip(r) A) is positively
homogeneous in A (for c > 0, min(r cA, clip(r) cA) = c min(r A, clip(r) A), and the clip branch depends on the sign of
A only), and the `global` normaliser counts every generated sample, kept or not, so the loss is linear in the keep
indicators: E[keep_i / p_i] = 1 gives the full loss's gradient in expectation. The KL term (beta) does not carry A and
the `paper` normaliser divides by the kept rows, so both would be biased: config.py refuses dppo with either. The
expectation holds for the gradient; AdamW and clipping are not linear in it, so the parameter update is not unbiased.

Departures from the papers: PODS's loss keeps the global normaliser over all G samples (m / G of the paper's scale, a
constant that AdamW absorbs); GRESO's exploration rate is fixed (the paper adapts it to a target zero-variance share)
and skipped prompts are not replaced (the step trains on fewer prompts); DPPO prunes completions only (not prompts)
and packs with DASH's packer. Prompts are keyed by a hash of their text, which every task has (the built-in task has
no row number). The GRESO state rides in checkpoints (`state_dict`), so a resume continues exactly.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import torch

from dash.config import DashConfig
from dash.rl.rollout import group_advantages, keep_mask, zero_non_finite

_SEED_STRIDE = 1_000_003  # rollout_sampler.py's (run seed, step) mix; x 4 below gives each salt (< 4) its own stream
_SEED_MODULUS = 2**63
_DPPO_SALT, _GRESO_SALT = 1, 2  # independent random streams for the two random rules
_PROMPT_KEY_BYTES = 8  # 64-bit prompt hashes: a collision among 1e6 prompts has probability ~3e-8


def _generator(run_seed: int, step: int, salt: int) -> torch.Generator:
    """A CPU generator that depends on (run seed, step, rule) alone: the same draws on every rank and after resume."""
    return torch.Generator().manual_seed(((run_seed * 7919 + step) * _SEED_STRIDE * 4 + salt) % _SEED_MODULUS)


class Selection(NamedTuple):
    """Attributes: advantages [S] fp32, the loss's advantages (dppo: A / p on kept samples); keep [S] bool."""
    advantages: torch.Tensor
    keep: torch.Tensor


def dash_filter(cfg: DashConfig, advantages: torch.Tensor) -> torch.Tensor:
    """DASH's |A| > loss.adv_threshold keep mask [S]; every sample under grpo or loss.gradient_filtering=false."""
    filtering = cfg.train.algorithm == "dash" and cfg.loss.gradient_filtering
    return keep_mask(advantages, cfg.loss.adv_threshold if filtering else None)


def max_variance_subset(rewards: torch.Tensor, m: int) -> torch.Tensor:
    """Per group, the m of n rewards whose (population) variance is largest, as a keep mask.

    The maximiser takes the i largest and m - i smallest rewards for some i (PODS, Theorem 1), so after one sort only
    m + 1 candidates remain, each scored in O(1) from prefix sums: O(n log n) per group. Ties go to the smallest i.
    Args: rewards [P, n]. Returns: [P, n] bool with exactly m True per row.
    """
    P, n = rewards.shape
    r = rewards.double()
    order = torch.sort(r, dim=1, stable=True).indices  # [P, n] ascending
    s = torch.gather(r, 1, order)  # [P, n]
    zero = torch.zeros(P, 1, dtype=torch.float64)
    cs, cs2 = torch.cat([zero, s.cumsum(1)], 1), torch.cat([zero, (s * s).cumsum(1)], 1)  # [P, n + 1]
    tops = torch.arange(m + 1)  # i: how many of the largest rewards the candidate takes
    total = cs[:, m - tops] + cs[:, n:] - cs[:, n - tops]  # [P, m + 1]
    total2 = cs2[:, m - tops] + cs2[:, n:] - cs2[:, n - tops]  # [P, m + 1]
    best = torch.argmax(total2 / m - (total / m) ** 2, dim=1)  # [P], first maximum on ties
    pos = torch.arange(n)
    sorted_keep = (pos < (m - best)[:, None]) | (pos >= (n - best)[:, None])  # [P, n] in sorted order
    return torch.zeros(P, n, dtype=torch.bool).scatter(1, order, sorted_keep)


def pods(rewards: torch.Tensor, group_size: int, m: int) -> Selection:
    """PODS down-sampling of each group to m samples; advantages normalised over the kept m (as rollout.py does over
    G). Args: rewards [S], groups of group_size consecutive rows."""
    grouped = rewards.reshape(-1, group_size)  # [P, G]
    keep = max_variance_subset(grouped, m)  # [P, G]
    kept_rewards = grouped[keep]  # [P * m], group by group, each group's rows in their original order
    adv = torch.zeros(keep.shape, dtype=torch.float32)  # [P, G]
    adv[keep] = zero_non_finite(group_advantages(kept_rewards, m))[0]  # a reward beyond fp32: A = 0, as rollout.py
    return Selection(adv.view(-1), keep.view(-1))


def dppo_keep_probability(advantages: torch.Tensor, min_keep: float, adv_scale: float) -> torch.Tensor:
    """p_i = clamp(|A_i| / adv_scale, min_keep, 1): small-|A| samples are the ones pruned. Args/returns: [S]."""
    return (advantages.abs() / adv_scale).clamp(min=min_keep, max=1.0)


def dppo(advantages: torch.Tensor, p: torch.Tensor, u: torch.Tensor) -> Selection:
    """Keep sample i when u_i < p_i and A_i != 0 (an A = 0 sample adds exactly nothing: beta is 0 under dppo), and
    rescale its advantage by 1 / p_i. Args: advantages, p, u (uniform draws in [0, 1)): [S]."""
    keep = (u < p) & (advantages != 0)  # [S]
    return Selection(torch.where(keep, advantages / p, torch.zeros_like(advantages)), keep)


def select_samples(cfg: DashConfig, rewards: torch.Tensor, advantages: torch.Tensor, step: int,
                   first_sample: int = 0) -> Selection:
    """The rule's advantages and keep mask for this rank's samples. first_sample: index of this rank's first sample in
    the step (dppo draws for the whole step and takes this rank's slice, so the split over ranks changes nothing).
    Args: rewards, advantages [S] (advantages from group_advantages over whole groups)."""
    sel = cfg.loss.selection
    if sel.rule == "pods":
        return pods(rewards, cfg.train.group_size, sel.pods_keep)
    if sel.rule == "dppo":
        g = _generator(cfg.train.seed, step, _DPPO_SALT)
        u = torch.rand(first_sample + len(advantages), generator=g)[first_sample:]  # [S]
        return dppo(advantages, dppo_keep_probability(advantages, sel.dppo_min_keep, sel.dppo_adv_scale), u)
    if sel.rule == "none":
        return Selection(advantages, keep_mask(advantages, None))
    return Selection(advantages, dash_filter(cfg, advantages))  # dash_filter, and greso after its pre-rollout skip


def prompt_key(example) -> str:
    """A prompt's identity across steps and epochs: a hash of its text."""
    return hashlib.blake2b(example.prompt.encode(), digest_size=_PROMPT_KEY_BYTES).hexdigest()


class SampleSelector:
    """The rule's state across steps: GRESO's zero-variance streak per prompt (other rules keep none).

    Attributes:
        streaks: prompt key -> how many of its latest groups in a row had zero reward variance (absent: 0).
    """

    def __init__(self, cfg: DashConfig):
        self.cfg = cfg
        self.greso = cfg.loss.selection.rule == "greso"
        self.streaks: dict[str, int] = {}

    def skip_probability(self, key: str) -> float:
        sel, z = self.cfg.loss.selection, self.streaks.get(key, 0)
        return 0.0 if z == 0 else min(sel.greso_max_skip, 1.0 - (1.0 - sel.greso_base_skip) ** z)

    def before_rollout(self, examples: list, step: int, world_size: int = 1) -> tuple[list, int]:
        """(the prompts to generate, how many were skipped). GRESO only; every rank draws the same skips. At least
        `world_size` prompts, and a multiple of it, are kept (each rank samples whole, equal shares): the first
        skipped prompts are put back until that holds."""
        if not self.greso:
            return examples, 0
        u = torch.rand(len(examples), generator=_generator(self.cfg.train.seed, step, _GRESO_SALT)).tolist()
        skip = [x < self.skip_probability(prompt_key(e)) for x, e in zip(u, examples)]
        kept = len(examples) - sum(skip)
        need = max(world_size, math.ceil(kept / world_size) * world_size) - kept
        for i in range(len(skip)):
            if need <= 0:
                break
            if skip[i]:
                skip[i], need = False, need - 1
        return [e for e, s in zip(examples, skip) if not s], sum(skip)

    def observe(self, examples: list, share: tuple[int, int], rewards: torch.Tensor, parallel) -> None:
        """GRESO: update the streaks from this step's groups (`examples`: the generated prompts, the same list on
        every rank; `rewards` [S]: this rank's share). One collective joins the ranks' zero-variance flags."""
        if not self.greso:
            return
        G, (lo, hi) = self.cfg.train.group_size, share
        groups = rewards.view(-1, G)  # [hi - lo, G]
        flags = [0.0] * len(examples)
        flags[lo:hi] = (groups.amax(1) == groups.amin(1)).double().tolist()
        for example, flag in zip(examples, parallel.sum(flags)):
            key = prompt_key(example)
            if flag:
                self.streaks[key] = self.streaks.get(key, 0) + 1
            else:
                self.streaks.pop(key, None)

    def state_dict(self) -> dict:
        return {"rule": self.cfg.loss.selection.rule, "streaks": dict(self.streaks)}

    def load_state_dict(self, state: dict) -> None:
        streaks = state.get("streaks", {})
        if not isinstance(streaks, dict) or not all(isinstance(k, str) and isinstance(v, int) and v > 0
                                                    for k, v in streaks.items()):
            raise ValueError(f"selection state: streaks must map prompt keys to counts >= 1, got {streaks!r:.200}")
        self.streaks = dict(streaks)


def selection_metrics(kept: float, total_prompts: int, group_size: int, skipped: int) -> dict:
    """select/kept_frac: samples trained over all the step's prompts x G (skipped prompts count as not kept);
    select/skipped_prompts: prompts GRESO kept from generation."""
    return {"select/kept_frac": kept / (total_prompts * group_size), "select/skipped_prompts": skipped}
