"""One DASH optimizer step over packed, filtered micro-batches == the reference loss on one big batch.

The reference side never touches the trainer's packing code: it runs the model's padded `forward`, takes log-probs
from the materialised logits (dash_kernels.reference) and applies `policy_loss` with the filtered rows masked out.
The tolerance (2e-5 relative to the largest gradient entry) covers fp32 summation-order differences between a packed
varlen forward + chunked fused loss and a padded forward + materialised log-softmax; the model parity tests measure
forward/backward differences of this kind at ~3e-6.
"""

import dataclasses
import math

import pytest
import torch

from dash.config import DashConfig, LossConfig, SamplingConfig, TrainConfig
from dash.model import CausalLM
from dash.model_config import ModelConfig
from dash.rl.loss_norm import global_normalizer
from dash.rl.packing import collate
from dash.rl.rollout import Rollout, group_advantages, keep_mask
from dash.rl.step import PolicyUpdate, StepMicroBatches, frozen_copy, run_step
from dash_kernels.reference import policy_loss, token_logprobs_from_logits_ref

G, PROMPTS, VOCAB, MAX_NEW = 4, 6, 23, 5
GRAD_RTOL = 2e-5


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64)
    model = CausalLM(cfg)
    with torch.no_grad():  # HF-style small init: near-uniform softmax, so ratios and gradients are O(1), not ~0
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model


def make_rollout(seed=0, all_informative=False, rank_skew=False) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    S = PROMPTS * G
    prompts = [torch.randint(1, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(PROMPTS)]
    prompt_ids = [prompts[i // G] for i in range(S)]
    comps = [torch.randint(1, VOCAB, (int(torch.randint(1, MAX_NEW + 1, (1,), generator=g)),), generator=g).tolist()
             for _ in range(S)]
    # groups 0, 3 all right / all wrong (filtered); the others mixed
    pattern = [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 1, 0]]
    if all_informative:
        pattern = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 0]]
    if rank_skew:  # on 2 ranks (prompts 0-2 | 3-5), rank 1 gets only uniform groups: zero kept samples
        pattern = [[1, 0, 0, 0], [1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    rewards = torch.tensor([r for grp in pattern for r in grp], dtype=torch.float32)
    # near the policy's own log-probs (about -log V at this init) +- 0.3: ratios in ~[0.74, 1.35], so PPO clips some
    old = [(torch.rand(len(c), generator=g) - 0.5) * 0.6 - math.log(VOCAB) for c in comps]
    return Rollout(prompt_ids, comps, old, rewards, G)


def config(loss_type, normalizer, beta, token_budget=0, micro=8, algorithm="dash", share_prompts=True):
    return DashConfig(
        sampling=SamplingConfig(temperature=0.9, max_new_tokens=MAX_NEW),
        loss=LossConfig(loss_type=loss_type, normalizer=normalizer, beta=beta, adv_threshold=0.1),
        train=TrainConfig(algorithm=algorithm, micro_batch_size=micro, group_size=G, token_budget=token_budget,
                          prompts_per_step=PROMPTS, old_logp="sampler", share_prompts=share_prompts),
    )


def grads_of(model):
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


def trainer_grads(cfg, model, ref_model, rollout):
    model.zero_grad(set_to_none=True)
    update = PolicyUpdate(cfg, model, optimizer=None, scheduler=None, ref_model=ref_model)
    adv = group_advantages(rollout.rewards, G)
    keep = keep_mask(adv, cfg.loss.adv_threshold)
    plan = StepMicroBatches(cfg, rollout, keep, (len(rollout), rollout.completion_tokens()))
    for idx, norm in zip(plan.plan, plan.norms):
        mb = collate(rollout, idx, adv, torch.device("cpu"), cfg.train.share_prompts)
        assert mb.shared is None or cfg.train.share_prompts
        plan.shared_rows = getattr(plan, "shared_rows", 0) + (0 if mb.shared is None else mb.num_tokens)
        update.backward(mb, norm, mb.old_logp)
    return grads_of(model), plan


def padded_logp(model, rollout, rows, temperature):
    """Reference log-probs via the padded forward: [len(rows), MAX_NEW]."""
    seqs = [rollout.prompt_ids[i] + rollout.completion_ids[i] for i in rows]
    L = max(map(len, seqs))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    targets = torch.full((len(rows), MAX_NEW), -100)
    pos = torch.zeros(len(rows), MAX_NEW, dtype=torch.long)
    for b, (i, s) in enumerate(zip(rows, seqs)):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
        p, c = len(rollout.prompt_ids[i]), rollout.completion_ids[i]
        targets[b, : len(c)] = torch.tensor(c)
        pos[b, : len(c)] = torch.arange(p - 1, p - 1 + len(c))
    logits = model(ids, attn)  # [B, L, V]
    picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, VOCAB))  # [B, MAX_NEW, V]
    return token_logprobs_from_logits_ref(picked, targets, temperature), targets != -100


def reference_grads(cfg, model, ref_model, rollout):
    model.zero_grad(set_to_none=True)
    lc = cfg.loss
    adv = group_advantages(rollout.rewards, G)
    keep = keep_mask(adv, lc.adv_threshold)
    old = torch.zeros(len(rollout), MAX_NEW)
    for i, o in enumerate(rollout.old_logp):
        old[i, : len(o)] = o
    if lc.normalizer == "global":
        groups = [list(range(len(rollout)))]
        norms = [global_normalizer(lc.loss_type, len(rollout), rollout.completion_tokens(), MAX_NEW)]
    else:  # the paper: per fixed micro-batch of 8 over its kept rows, / accumulation steps
        groups = [list(range(s, s + 8)) for s in range(0, len(rollout), 8)]
        acc = len(groups)
        norms = []
        for grp in groups:
            kept = [i for i in grp if keep[i]]
            toks = sum(len(rollout.completion_ids[i]) for i in kept)
            norms.append({"grpo": len(kept) * acc, "dr_grpo": len(kept) * MAX_NEW * acc}.get(lc.loss_type, toks * acc))
    total = 0.0
    for grp, norm in zip(groups, norms):
        logp, mask = padded_logp(model, rollout, grp, cfg.sampling.temperature)
        mask = mask & keep[grp].unsqueeze(1)  # the filtered samples are masked out of the big batch
        if not mask.any():
            continue
        ref = None
        if lc.beta > 0:
            with torch.no_grad():
                ref, _ = padded_logp(ref_model, rollout, grp, cfg.sampling.temperature)
        loss, _ = policy_loss(logp, old[grp], adv[grp], mask, ref, loss_type=lc.loss_type, eps_low=lc.eps_low,
                              eps_high=lc.eps_high, beta=lc.beta, normalizer=norm, max_completion_length=MAX_NEW)
        total = total + loss
    total.backward()
    return grads_of(model)


def perturbed_reference(model):
    ref = frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("normalizer", ["global", "paper"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_packed_filtered_update_equals_big_batch_reference(loss_type, normalizer, beta, share_prompts):
    model = tiny_model()
    ref_model = perturbed_reference(model) if beta else None
    rollout = make_rollout()
    cfg = config(loss_type, normalizer, beta, token_budget=40, share_prompts=share_prompts)
    ours, plan = trainer_grads(cfg, model, ref_model, rollout)
    theirs = reference_grads(cfg, model, ref_model, rollout)
    assert sum(len(mb) for mb in plan.plan) == 16  # 2 of 6 groups filtered: 16 of 24 samples trained on
    assert (plan.shared_rows > 0) == share_prompts  # the shared-prompt path really ran
    scale = theirs.abs().max()
    assert scale > 0
    assert (ours - theirs).abs().max() <= GRAD_RTOL * scale, float((ours - theirs).abs().max() / scale)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_global_normalizer_update_is_independent_of_packing(loss_type):
    model = tiny_model()
    rollout = make_rollout(seed=3)
    base, _ = trainer_grads(config(loss_type, "global", 0.0, token_budget=0, micro=4), model, None, rollout)
    for budget, micro in [(12, 8), (40, 8), (1000, 24)]:
        other, plan = trainer_grads(config(loss_type, "global", 0.0, token_budget=budget, micro=micro), model, None,
                                    rollout)
        assert (other - base).abs().max() <= GRAD_RTOL * base.abs().max()


class FixedSampler:
    """Stands in for the engine: prompt k of a step always gets the same completions, whatever the call."""

    def __init__(self, rollout):
        self.rollout, self.reward_seconds = rollout, 0.0
        self.reward_stats = type("S", (), {"failures": 0, "no_reward": 0})()

    def sample(self, examples, group_size, run_seed, step, first_index):
        rows = range(first_index * G, (first_index + len(examples)) * G)
        r = self.rollout
        return Rollout([r.prompt_ids[i] for i in rows], [r.completion_ids[i] for i in rows],
                       [r.old_logp[i] for i in rows], r.rewards[list(rows)], G)


@pytest.mark.parametrize("normalizer", ["global", "paper"])
def test_grpo_and_dash_give_the_same_update_when_every_group_is_informative(normalizer):
    rollout = make_rollout(seed=5, all_informative=True)
    updates = []
    for algorithm in ("grpo", "dash"):
        model = tiny_model()
        cfg = config("dr_grpo", normalizer, 0.0, token_budget=30, algorithm=algorithm)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-2, grad_clip=0.0))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        update = PolicyUpdate(cfg, model, opt, sched)
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        metrics, _ = run_step(cfg, FixedSampler(rollout), update, list(range(PROMPTS)), step=0)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        updates.append(after - before)
        assert metrics["rollout/sampling_calls"] == (PROMPTS * G // 8 if algorithm == "grpo" else 1)
    assert updates[0].abs().max() > 0
    assert (updates[0] - updates[1]).abs().max() <= GRAD_RTOL * updates[0].abs().max()


def test_with_beta_zero_filtering_leaves_the_update_unchanged():
    """Uniform groups have A = 0 exactly, so dropping them (dash) changes nothing vs training on them (grpo)."""
    rollout = make_rollout(seed=2)  # 2 of 6 groups uniform: dash trains on 16 of 24 samples
    updates, kept = [], []
    for algorithm in ("grpo", "dash"):
        model = tiny_model()
        cfg = config("dr_grpo", "global", 0.0, token_budget=30, algorithm=algorithm)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_clip=0.0))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        update = PolicyUpdate(cfg, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0))
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        metrics, _ = run_step(cfg, FixedSampler(rollout), update, list(range(PROMPTS)), step=0)
        updates.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before)
        kept.append(metrics["rollout/kept_frac"])
    assert kept == [1.0, 16 / 24]
    assert (updates[0] - updates[1]).abs().max() <= GRAD_RTOL * updates[0].abs().max()
