"""Advantages, the gradient filter, micro-batch planning and collation."""

import pytest
import torch

from dash.rl.packing import IGNORE_INDEX, collate, plan_balanced, plan_fixed
from dash.rl.rollout import Rollout, group_advantages, keep_mask


def test_group_advantages_binary_rewards_take_paper_values():
    r = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float32)
    a = group_advantages(r, 4)
    # 1/4 right: +1.5 / -0.5; 2/4: +-0.866; 4/4 and 0/4: 0 (up to the 1e-4 in the std)
    assert torch.allclose(a[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-3)
    assert torch.allclose(a[4:8].abs(), torch.full((4,), 0.866), atol=1e-3)
    assert torch.equal(a[8:], torch.zeros(8))
    keep = keep_mask(a, 0.1)
    assert keep.tolist() == [True] * 8 + [False] * 8  # exactly the mixed groups survive
    assert keep_mask(a, None).all()


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 4)


def test_plan_fixed_filters_within_paper_microbatches():
    keep = torch.tensor([True, False, False, False, False, False, False, False, True, True])
    assert plan_fixed(10, 4, keep) == [[0], [8, 9]]


@pytest.mark.parametrize("rows,budget", [(8, 0), (64, 40), (3, 25), (100, 7)])
def test_plan_balanced_respects_budgets_and_covers_kept(rows, budget):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (50,), generator=g).tolist()
    keep = torch.rand(50, generator=g) > 0.4
    plan = plan_balanced(lengths, keep, rows, budget)
    flat = sorted(i for mb in plan for i in mb)
    assert flat == [i for i in range(50) if keep[i]]
    for mb in plan:
        assert len(mb) <= rows
        if budget and len(mb) > 1:
            assert sum(lengths[i] for i in mb) <= budget
    if budget == 40:  # balanced: no micro-batch is far below the mean load
        loads = [sum(lengths[i] for i in mb) for mb in plan]
        assert max(loads) - min(loads) <= max(lengths)


def test_collate_layout():
    ro = Rollout(prompt_ids=[[5, 6, 7], [5, 6]], completion_ids=[[1, 2], [3, 4, 9]],
                 old_logp=[torch.tensor([-0.1, -0.2]), torch.tensor([-0.3, -0.4, -0.5])],
                 rewards=torch.tensor([1.0, 0.0]), group_size=2)
    mb = collate(ro, [0, 1], torch.tensor([0.7, -0.7]), torch.device("cpu"))
    assert mb.input_ids.tolist() == [5, 6, 7, 1, 5, 6, 3, 4]
    assert mb.cu_seqlens.tolist() == [0, 4, 8] and mb.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # the hidden state at the last prompt token predicts the first completion token
    assert mb.gather_index.tolist() == [[2, 3, 0], [5, 6, 7]]
    assert mb.targets.tolist() == [[1, 2, IGNORE_INDEX], [3, 4, 9]]
    assert mb.mask.tolist() == [[True, True, False], [True, True, True]]
    assert torch.allclose(mb.old_logp[1], torch.tensor([-0.3, -0.4, -0.5]))


def test_collate_shares_each_prompt_once():
    """Two samples of prompt [5, 6, 7] and one of [8, 9]: the shared prompt's rows appear once in the packed input,
    and the attention layout (expand) rebuilds each sample's full sequence."""
    ro = Rollout(prompt_ids=[[5, 6, 7], [8, 9], [5, 6, 7]], completion_ids=[[1, 2], [3], [4, 9, 2]],
                 old_logp=[torch.tensor([-0.1, -0.2]), torch.tensor([-0.3]), torch.tensor([-0.4, -0.5, -0.6])],
                 rewards=torch.tensor([1.0, 0.0, 0.0]), group_size=1)
    mb = collate(ro, [0, 1, 2], torch.tensor([0.7, -0.7, 0.1]), torch.device("cpu"), share_prompts=True)
    # packed rows: prompt A (0-2), comp 0 minus last (3), comp 2 minus last (4-5), prompt B (6-7); comp 1 has no rows
    assert mb.input_ids.tolist() == [5, 6, 7, 1, 4, 9, 8, 9]
    assert mb.positions.tolist() == [0, 1, 2, 3, 3, 4, 0, 1]
    assert mb.shared.expand.tolist() == [0, 1, 2, 3, 0, 1, 2, 4, 5, 6, 7]
    assert mb.input_ids[mb.shared.expand].tolist() == [5, 6, 7, 1, 5, 6, 7, 4, 9, 8, 9]  # full sequences
    assert mb.cu_seqlens.tolist() == [0, 4, 9, 11]
    assert mb.shared.select.tolist() == [0, 1, 2, 3, 7, 8, 9, 10]
    # rows are in `indices` order; the prompt's last row (2) predicts token 0 of both of its samples
    assert mb.gather_index.tolist() == [[2, 3, 0], [7, 0, 0], [2, 4, 5]]
    assert mb.targets.tolist() == [[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX], [4, 9, 2]]


def test_shared_prompt_forward_equals_separate_rows():
    """The hidden states the loss reads are the same with and without prompt sharing (fp32, a few ulp)."""
    from dash.model import CausalLM, ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(model_type="qwen2", vocab_size=16, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True, max_position_embeddings=64))
    ro = Rollout(prompt_ids=[[5, 6, 7], [5, 6, 7], [8, 9], [5, 6, 7]], completion_ids=[[1, 2], [3], [4, 9, 2], [1]],
                 old_logp=[torch.zeros(2), torch.zeros(1), torch.zeros(3), torch.zeros(1)],
                 rewards=torch.zeros(4), group_size=1)
    hidden = []
    for share in (False, True):
        mb = collate(ro, [0, 1, 2, 3], torch.zeros(4), torch.device("cpu"), share_prompts=share)
        h = model.forward_packed(mb.input_ids, mb.cu_seqlens, mb.positions, shared=mb.shared)
        hidden.append(h[mb.gather_index] * mb.mask[..., None])
    assert mb.num_tokens == 3 + 1 + 0 + 0 + 2 + 2  # prompt A once, completions minus their last token, prompt B
    assert torch.allclose(hidden[0], hidden[1], rtol=0, atol=1e-6)
