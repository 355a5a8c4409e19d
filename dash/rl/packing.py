"""Plan the backprop micro-batches of a step and collate them into packed tensors.

Two plans, matching the two loss normalisers (dash/rl/loss_norm.py):
  * `plan_fixed`: the paper's micro-batches: consecutive runs of `rows` samples (whole groups) in sampling order,
    each filtered on its own; a micro-batch left with no kept sample is skipped (the paper's code instead keeps its
    row 0 with zero advantage, which only adds a KL term; we follow the paper's text: a filtered sample contributes
    nothing).
  * `plan_balanced`: DASH packing: only kept samples, longest first, into as few micro-batches as the row / token
    budget allows, each new sample going to the least-loaded micro-batch, so micro-batches have near-equal tokens.

`collate` turns a list of sample indices into the packed, padding-free input of `CausalLM.forward_packed` plus the
[B, Lc] completion-token layout the fused loss takes. With `share_prompts` (train.share_prompts, on by default) the
samples of one prompt share its rows: a group of G completions costs one prompt's projections and MLP, not G.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from dash.attention import SharedPrompts
from dash.rl.rollout import Rollout

IGNORE_INDEX = -100  # target id of padded completion slots (dash_kernels' ignore_index)


def plan_fixed(num_samples: int, rows: int, keep: torch.Tensor) -> list[list[int]]:
    """Consecutive micro-batches of `rows` samples, each reduced to its kept samples; empty ones dropped."""
    plan = []
    for start in range(0, num_samples, rows):
        kept = [i for i in range(start, min(start + rows, num_samples)) if bool(keep[i])]
        if kept:
            plan.append(kept)
    return plan


def plan_balanced(lengths: list[int], keep: torch.Tensor, rows: int, token_budget: int) -> list[list[int]]:
    """Kept samples into micro-batches of at most `rows` samples and (when token_budget > 0) `token_budget` tokens.

    Longest-processing-time-first: the number of micro-batches is the least that fits both budgets, then each sample,
    longest first, joins the micro-batch with the fewest tokens that still has room. A sample longer than the token
    budget gets a micro-batch of its own. Returned micro-batches list indices in ascending order.
    """
    kept = [i for i in range(len(lengths)) if bool(keep[i])]
    if not kept:
        return []
    total = sum(lengths[i] for i in kept)
    n_bins = -(-len(kept) // rows)
    if token_budget > 0:
        n_bins = max(n_bins, -(-total // token_budget))
    while True:
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        heap = [(0, b) for b in range(n_bins)]  # (tokens, bin)
        overflow = False
        for i in sorted(kept, key=lambda j: (-lengths[j], j)):
            skipped = []
            while heap:
                tokens, b = heapq.heappop(heap)
                fits_tokens = token_budget <= 0 or not bins[b] or tokens + lengths[i] <= token_budget
                if len(bins[b]) < rows and fits_tokens:
                    bins[b].append(i)
                    heapq.heappush(heap, (tokens + lengths[i], b))
                    break
                skipped.append((tokens, b))
            else:
                overflow = True
            for item in skipped:
                heapq.heappush(heap, item)
            if overflow:
                break
        if not overflow:
            return [sorted(b) for b in bins if b]
        n_bins += 1  # greedy fit failed at this count (uneven lengths): one more micro-batch


@dataclass(slots=True)
class MicroBatch:
    """Packed model input and the completion-token layout of the loss.

    Attributes:
        input_ids: [T] packed tokens: each distinct prompt once (shared) or once per sample, then each sample's
            completion minus its last token.
        cu_seqlens: [B+1] int32 offsets of the samples' full sequences in the attention layout (= the packed rows
            when `shared` is None).
        positions: [T] position of each token within its sample.
        gather_index: [B, Lc] index into T of the hidden state that predicts completion token j (0 at padding).
        targets: [B, Lc] completion token ids, IGNORE_INDEX at padding.
        mask: [B, Lc] bool, True at real completion tokens.
        old_logp: [B, Lc] fp32 sampler log-probs (0 at padding).
        advantages: [B] fp32.
        indices: the rollout rows, in order.
        shared: the prompt-sharing row maps (dash.attention.SharedPrompts), None when every sample has its own rows.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    gather_index: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    indices: list[int]
    shared: SharedPrompts | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def collate(rollout: Rollout, indices: list[int], advantages: torch.Tensor, device: torch.device,
            share_prompts: bool = False) -> MicroBatch:
    """Packs rollout rows `indices` (each a prompt + completion with at least one completion token).

    share_prompts: samples with the same prompt (a group's) share one copy of its rows; the forward then computes
    the prompt once for all of them and the loss is unchanged (see dash.attention.SharedPrompts).
    """
    B = len(indices)
    lc = max(len(rollout.completion_ids[i]) for i in indices)
    gather = torch.zeros(B, lc, dtype=torch.long)  # [B, Lc]
    targets = torch.full((B, lc), IGNORE_INDEX, dtype=torch.long)  # [B, Lc]
    old = torch.zeros(B, lc, dtype=torch.float32)  # [B, Lc]
    # Samples in groups of one prompt (first-seen order); without sharing every sample is its own group.
    groups: dict[object, list[int]] = {}
    for b, i in enumerate(indices):
        if not rollout.completion_ids[i]:
            raise ValueError(f"rollout row {i} has an empty completion; drop it before packing")
        groups.setdefault(tuple(rollout.prompt_ids[i]) if share_prompts else b, []).append(b)
    inputs, positions = [], []  # the packed rows
    expand, cu = [], [0]  # the attention layout: packed row of each token, per-sample offsets
    select = []  # packed row -> attention-layout row of its output
    for members in groups.values():
        prompt = rollout.prompt_ids[indices[members[0]]]
        p_rows = range(len(inputs), len(inputs) + len(prompt))
        inputs.extend(prompt)
        positions.extend(range(len(prompt)))
        select.extend(range(len(expand), len(expand) + len(prompt)))  # the prompt's first copy
        for b in members:
            comp = rollout.completion_ids[indices[b]]
            tail = comp[:-1]  # the last token predicts nothing we train on
            c_start = len(inputs)
            inputs.extend(tail)
            positions.extend(range(len(prompt), len(prompt) + len(tail)))
            expand.extend(p_rows)
            select.extend(range(len(expand), len(expand) + len(tail)))
            expand.extend(range(c_start, c_start + len(tail)))
            cu.append(len(expand))
            # completion token 0 is predicted by the prompt's last row, token j >= 1 by completion row j - 1
            gather[b, 0] = p_rows[-1]
            gather[b, 1: len(comp)] = torch.arange(c_start, c_start + len(tail))
            targets[b, : len(comp)] = torch.tensor(comp)
            old[b, : len(comp)] = rollout.old_logp[indices[b]].float()
    shared = None
    if len(expand) != len(inputs):  # some prompt rows are shared (else the two layouts coincide)
        shared = SharedPrompts(torch.tensor(expand, dtype=torch.long, device=device),
                               torch.tensor(select, dtype=torch.long, device=device))
    return MicroBatch(
        input_ids=torch.tensor(inputs, dtype=torch.long, device=device),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        gather_index=gather.to(device),
        targets=targets.to(device),
        mask=(targets != IGNORE_INDEX).to(device),
        old_logp=old.to(device),
        advantages=advantages[indices].float().to(device),
        indices=list(indices),
        shared=shared,
    )
