"""Turn prompts into a scored Rollout: one sampler call, then rewards (each call guarded by a timeout).

Every prompt gets its own sampling seed derived from (run seed, step, prompt's index in the step), and the sampler's
results do not depend on batch composition, so the GRPO baseline (many small calls) and DASH (one large call) draw
exactly the same completions for the same step: the comparison measures the schedule, not luck.
"""

from __future__ import annotations

import torch

from dash.engine import SamplingParams, generate
from dash.rewards import RewardScorer
from dash.rewards.user import example_columns
from dash.rl.rollout import Rollout

_SEED_STRIDE = 1_000_003  # a prime > prompts per step, so (step, index) pairs never share a seed
_SEED_MODULUS = 2**63


def prompt_seed(run_seed: int, step: int, index: int) -> int:
    # Modulo 2**63: a request seed is an int64 (any run seed works; the values of smaller seeds are unchanged).
    return ((run_seed * 7919 + step) * _SEED_STRIDE + index) % _SEED_MODULUS


class RolloutSampler:
    """Generates G completions per prompt from the live training model and scores them."""

    def __init__(self, model, tokenizer, sampling_cfg, reward_fn, reward_timeout_s: float = 10.0):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = sampling_cfg
        # A reward that raises or times out scores 0 and is counted in reward.stats; it never stops the run.
        # reward_fn: fn(completion, answer), TRL's fn(prompts, completions, **columns), or get_reward's RewardSum.
        self.reward = RewardScorer(reward_fn, timeout_s=reward_timeout_s)

    @property
    def reward_stats(self):
        return self.reward.stats

    @property
    def reward_seconds(self) -> float:
        """Accumulated time spent in reward calls (reported apart from generation)."""
        return self.reward.stats.seconds

    def params(self, seed: int, temperature: float | None = None):
        """The config's sampling settings with this seed; a given temperature (evals: 0 = greedy) drops top-k/p."""
        return SamplingParams(
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p if temperature is None else 1.0,
            top_k=self.cfg.top_k if temperature is None else 0,
            max_new_tokens=self.cfg.max_new_tokens,
            min_new_tokens=self.cfg.min_new_tokens,
            seed=seed,
        )

    def generate(self, prompts: list[str], n: int, seeds: list[int], temperature: float | None = None):
        """-> per prompt, n completions (token ids, text, log-probs, finish reason)."""
        params = [self.params(s, temperature) for s in seeds]
        return generate(self.model, self.tokenizer, prompts, n=n, params=params, page_size=self.cfg.page_size,
                        num_pages=self.cfg.num_pages, cuda_graphs=self.cfg.cuda_graphs)

    def sample(self, examples: list, group_size: int, run_seed: int, step: int, first_index: int) -> Rollout:
        """One generate call for all `examples` x G; rewards scored in one batch (TRL-form terms: one call)."""
        prompts = [e.prompt for e in examples]
        seeds = [prompt_seed(run_seed, step, first_index + i) for i in range(len(examples))]
        outputs = self.generate(prompts, group_size, seeds)
        prompt_ids, comp_ids, old_logp, texts, answers, rows = [], [], [], [], [], []
        for example, request in zip(examples, outputs, strict=True):
            ids = request.prompt_token_ids
            for comp in request.completions:
                prompt_ids.append(list(ids))
                comp_ids.append(list(comp.token_ids))
                old_logp.append(torch.as_tensor(comp.logprobs, dtype=torch.float32))
                texts.append(comp.text)
                answers.append(example.answer)
                rows.append(example)
        rewards = self.reward.score_batch([e.prompt for e in rows], texts, answers,
                                          [example_columns(e) for e in rows], comp_ids)
        return Rollout(prompt_ids, comp_ids, old_logp, torch.tensor(rewards, dtype=torch.float32), group_size,
                       texts=texts, answers=answers)

    def score(self, text: str, answer: str, example=None) -> float:
        """The reward of one completion (`example`: its row, for a TRL-form reward's columns); a raising or timed-out
        reward function gives 0 and is counted."""
        return self.reward.score(text, answer, example)
