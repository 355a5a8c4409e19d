"""FSDP2 pieces in this process, on a one-rank gloo group (no torchrun): the generation phase gathers every sharded
module exactly once and samples exactly what the unsharded model samples; an FSDP optimizer step equals the plain
one; a sharded checkpoint loads into a plain model. The 2-process behaviour (padding, resume) is in
test_distributed.py."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

from dash.engine import SamplingParams, generate
from dash.rl.checkpoint import is_sharded_checkpoint, load_sharded, save_sharded_checkpoint
from dash.rl.distributed import DistInfo
from dash.rl.fsdp import fsdp_modules, gathered, shard_model
from dash.rl.step import PolicyUpdate, run_step
from dash.rl.warmstart import build_tiny_model
from dash.tokenizer import build_arith_tokenizer
from tests.rl.test_distributed import FIXED_ROLLOUT_SEED, one_update_setup
from tests.rl.test_update_equivalence import PROMPTS, FixedSampler, make_rollout

ONE_RANK = DistInfo(rank=0, world_size=1)


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor")


def test_generation_gathers_each_module_once_and_samples_like_the_plain_model(one_rank_group, monkeypatch):
    plain = build_tiny_model(seed=1).eval()
    model = shard_model(copy.deepcopy(plain), average_grads=False)
    tok = build_arith_tokenizer()
    prompts = ["12+3*4=", "7+8*9=", "1+2*3="]
    params = [SamplingParams(temperature=1.0, max_new_tokens=6, seed=s) for s in range(len(prompts))]
    # On one rank FSDP skips the all-gather call itself and copies the shard; what is counted is each time a module's
    # full parameters are materialised, which is where a W-rank group all-gathers.
    calls = []
    real = FSDPParamGroup._to_unsharded

    def counting(group):
        calls.append(group.is_unsharded)
        return real(group)

    monkeypatch.setattr(FSDPParamGroup, "_to_unsharded", counting)
    with torch.no_grad():
        want = generate(plain, tok, prompts, n=4, params=params)
        with gathered(model):
            assert not any(_is_dtensor(p) for p in model.parameters())  # the engine sees plain full tensors
            got = generate(model, tok, prompts, n=4, params=params)
    assert calls.count(False) == len(fsdp_modules(model))  # one all-gather per sharded module for the whole phase
    assert all(_is_dtensor(p) for p in model.parameters())  # sharded again after the phase
    for w, g in zip(want, got, strict=True):
        assert [c.token_ids for c in w.completions] == [c.token_ids for c in g.completions]


def test_fsdp_update_equals_plain_update(one_rank_group):
    shard = lambda m: shard_model(m, average_grads=False)  # noqa: E731
    results = []
    for wrap in (None, shard):
        cfg, model, opt, sched = one_update_setup(wrap)
        with gathered(model):
            before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        sampler = FixedSampler(make_rollout(seed=FIXED_ROLLOUT_SEED, rank_skew=True))
        metrics, _ = run_step(cfg, sampler, PolicyUpdate(cfg, model, opt, sched), list(range(PROMPTS)), 0, ONE_RANK)
        with gathered(model):
            results.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before, metrics))
    (plain, m_plain), (fsdp, m_fsdp) = results
    assert plain.abs().max() > 0
    # same kernels, same order on one rank: only FSDP's flat-buffer copies differ, which are exact
    torch.testing.assert_close(fsdp, plain, rtol=0, atol=1e-9)
    assert m_fsdp["train/grad_norm"] == pytest.approx(m_plain["train/grad_norm"], rel=1e-6)


def test_sharded_checkpoint_loads_into_a_plain_model(one_rank_group, tmp_path):
    model = shard_model(build_tiny_model(seed=1), average_grads=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    want = {k: v.detach().full_tensor() for k, v in model.state_dict().items()}  # FSDP state dicts hold shards
    path = save_sharded_checkpoint(tmp_path, 1, model, opt, {"note": "x"}, ONE_RANK)
    assert is_sharded_checkpoint(path) and (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-1"
    plain = build_tiny_model(seed=2)  # other weights: everything must come from the checkpoint
    load_sharded(path, plain)
    got = plain.state_dict()
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert torch.equal(v, got[k]), k


@pytest.mark.parametrize("written,resumed", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_resume_with_the_other_parallel_mode_is_a_config_error(tmp_path, written, resumed):
    from dash.config import ConfigError, load_config
    from dash.rl.checkpoint import save_checkpoint
    from dash.rl.trainer import Trainer

    model = build_tiny_model(seed=1)
    if written == "ddp":
        path = save_checkpoint(tmp_path, 1, model, build_arith_tokenizer(), {})
    else:
        path = save_sharded_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {}, ONE_RANK)
    trainer = Trainer(load_config(None, [f"--train.parallel={resumed}", "--model.device=cpu"]), quiet=True)
    with pytest.raises(ConfigError, match=rf"train\.parallel={written}"):
        trainer.setup(resume=str(path))
