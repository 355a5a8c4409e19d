"""A step's samples, their group advantages, and DASH's gradient filter.

A rollout holds the G completions of each prompt as consecutive rows (sample i belongs to group i // G), the
sampler's per-token log-probs (the `old_logp` of the importance ratio) and the verifiable rewards.

Advantages follow the paper's code (TRL GRPO): A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4) with the unbiased
std. With binary rewards and G = 4, |A| takes the values {0, 0.5, 0.866, 1.5}, so the paper's filter |A| <= 0.1 drops
exactly the zero-variance groups (all right or all wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ADV_STD_EPS = 1e-4  # the paper's code (TRL) adds this to the group std


@dataclass(slots=True)
class Rollout:
    """The samples of one optimizer step (or of one GRPO micro-batch).

    Attributes:
        prompt_ids: [S] lists of prompt token ids (S = prompts * G; a group's rows are consecutive).
        completion_ids: [S] lists of completion token ids (EOS included when the sampler stopped on it).
        old_logp: [S] fp32 tensors [len(completion_ids[i])], the sampler's log-prob of each sampled token.
        rewards: [S] fp32.
        group_size: G.
        texts: [S] decoded completions (for logs).
        answers: [S] reference answers (for logs).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    old_logp: list[torch.Tensor]
    rewards: torch.Tensor
    group_size: int
    texts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completion_ids)

    def completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """Joins micro-batch rollouts (the GRPO baseline samples per micro-batch) into one step's rollout."""
        if not parts:
            raise ValueError("Rollout.concat needs at least one rollout")
        return Rollout(
            prompt_ids=[p for r in parts for p in r.prompt_ids],
            completion_ids=[c for r in parts for c in r.completion_ids],
            old_logp=[lp for r in parts for lp in r.old_logp],
            rewards=torch.cat([r.rewards for r in parts]),
            group_size=parts[0].group_size,
            texts=[t for r in parts for t in r.texts],
            answers=[a for r in parts for a in r.answers],
        )


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Group-normalised advantages.

    Args:
        rewards: [S] with S a multiple of group_size; group g is rows g*G .. g*G+G-1.
        scale: divide by the group's unbiased std (+1e-4); False gives mean-centred rewards (Dr. GRPO style).
    Returns: [S] fp32.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [S] with S a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # [P, G]
    centred = r - r.mean(dim=1, keepdim=True)  # [P, G]
    if scale and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True) + ADV_STD_EPS)
    return centred.reshape(-1)  # [S]


def zero_non_finite(advantages: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(advantages with NaN / inf set to 0, how many were). A reward far beyond fp32's range overflows its group's
    mean or std; the reward guard (SafeReward's MAX_ABS_REWARD) prevents that, this keeps one such group from poisoning
    the step's loss if a reward ever bypasses it: its samples get A = 0 (no policy gradient; DASH's filter drops them).
    Args: advantages [S]."""
    bad = ~torch.isfinite(advantages)  # [S]
    count = int(bad.sum())
    return (advantages.masked_fill(bad, 0.0), count) if count else (advantages, 0)


def keep_mask(advantages: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """DASH gradient filter: True for samples with |A| > threshold; all True when threshold is None (GRPO)."""
    if threshold is None:
        return torch.ones_like(advantages, dtype=torch.bool)
    return advantages.abs() > threshold  # [S]
