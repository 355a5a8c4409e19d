"""Checkpoints (dash/rl/checkpoint.py, state_io.py, safe_dcp.py): whatever point a save is killed at, `--resume` finds
a complete checkpoint, and left-over temporary folders are cleaned up by the next save; a damaged checkpoint is
skipped with a warning naming the bad file; resume is bitwise (weights and optimizer state); and no checkpoint file is
ever unpickled, so a crafted one cannot run code (each payload below is first shown to fire when unpickled)."""

from __future__ import annotations

import io
import json
import pickle
import random
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

import dash.rl.checkpoint as ckpt
from dash.cli import main as cli_main
from dash.rl.checkpoint import CheckpointError, load_checkpoint, load_sharded, save_checkpoint, save_sharded_checkpoint
from dash.rl.distributed import DistInfo
from dash.rl.safe_dcp import SafeLoadPlanner, UnsafeCheckpointError
from dash.rl.state_io import JSON_FILE, TENSORS_FILE, load_state, save_state
from dash.rl.trainer import Trainer
from dash.rl.warmstart import build_tiny_model
from dash.tokenizer import build_arith_tokenizer
from tests.rl.test_trainer_e2e import _cfg, model_dir  # noqa: F401  (model_dir: a fixture used below)


def find_checkpoint(path):
    return load_checkpoint(path)[0]


@pytest.fixture(scope="module")
def parts():
    return build_tiny_model(seed=0), build_arith_tokenizer()


def _save(run, step, parts, marker):
    return save_checkpoint(run, step, *parts, {"marker": marker})


def _marker(path):
    return load_state(path)["marker"]


def test_resaving_a_step_replaces_it_and_leaves_nothing_behind(tmp_path, parts):
    _save(tmp_path, 2, parts, "first")
    _save(tmp_path, 2, parts, "second")  # a rerun of a finished run writes the step `latest` names
    root = tmp_path / "checkpoints"
    assert _marker(find_checkpoint(tmp_path)) == "second"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2"]


def test_a_save_killed_between_its_renames_still_resumes(tmp_path, parts, monkeypatch):
    _save(tmp_path, 1, parts, "one")
    _save(tmp_path, 2, parts, "two")
    real_replace, calls = ckpt.os.replace, []

    def killed_at_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old step-2 is aside, the new one not yet in place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, parts, "two again")
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-2" and not (root / "step-2").exists()
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        found = find_checkpoint(tmp_path)
    assert _marker(found) == "two"  # the previous step-2, moved aside, not the older step-1
    _save(tmp_path, 3, parts, "three")  # the next complete save cleans up
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1", "step-3"]  # the set-aside step-2 is gone


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_complete_step(tmp_path, parts):
    _save(tmp_path, 1, parts, "one")
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-9\n")
    (root / ".step-5-abc").mkdir()  # a temporary folder of a save killed before it was published
    with pytest.warns(UserWarning, match="resuming from"):
        assert _marker(find_checkpoint(tmp_path)) == "one"
    (root / "step-1" / JSON_FILE).unlink()
    with pytest.raises(CheckpointError, match="no complete step-N"):
        find_checkpoint(tmp_path)


def test_a_published_checkpoint_is_fsynced_before_latest_names_it(tmp_path, parts, monkeypatch):
    """Every file of the checkpoint and the `latest` pointer reach the disk (fsync) before the pointer is renamed in:
    after a power loss `latest` cannot name files that were still only in the page cache."""
    real_fsync, real_replace, events = ckpt.os.fsync, ckpt.os.replace, []

    def fsync(fd):
        events.append(("fsync", ckpt.os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    _save(tmp_path, 1, parts, "one")
    root = tmp_path / "checkpoints"
    before = [path for kind, path in events[: events.index(("replace", str(root / "latest")))] if kind == "fsync"]
    synced = set()  # files synced inside the temporary folder (.step-1-XXXX/...), before it became step-1
    for path in map(ckpt.Path, before):
        parts = path.relative_to(root).parts if path.is_relative_to(root) else ()
        if len(parts) > 1 and parts[0].startswith(".step-1-"):
            synced.add(ckpt.Path(*parts[1:]).as_posix())
    published = {p.relative_to(root / "step-1").as_posix() for p in (root / "step-1").rglob("*") if p.is_file()}
    assert published and published <= synced
    assert str(root / ".latest.tmp") in before


# -- the state files: exact, and damage falls back ---------------------------------------------------------------------
def test_state_files_round_trip_bitwise_with_the_types_json_lacks(tmp_path):
    model = build_tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 10, (2, 7))).float().sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": ckpt.rng_state(), "step": 3,
             "odd": {0: "int key", "__tensor__": "a key that looks like a tag", "floats": [float("nan"), -0.0, 0.1]}}
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back["step"] == 3 and back["odd"]["__tensor__"] == state["odd"]["__tensor__"] and back["odd"][0] == "int key"
    assert str(back["odd"]["floats"]) == "[nan, -0.0, 0.1]"
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # betas come back a tuple
    for key, moments in state["optimizer"]["state"].items():  # keyed by int, as load_state_dict needs
        for name, tensor in moments.items():
            got = back["optimizer"]["state"][key][name]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), (key, name)
    ckpt.set_rng_state(back["rng"])  # Python needs its state as tuples, numpy a uint32 key
    after = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(state["rng"])
    assert after == (random.random(), np.random.rand(), torch.rand(1))


@pytest.mark.slow
def test_resume_restores_weights_and_optimizer_state_bit_for_bit(model_dir, tmp_path):  # noqa: F811
    first = Trainer(_cfg(model_dir, tmp_path, "--model.dtype=bfloat16"), quiet=True)
    first.setup()
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    weights, optim = first.model.state_dict(), first.optimizer.state_dict()
    first.close()
    second = Trainer(_cfg(model_dir, tmp_path, "--model.dtype=bfloat16"), quiet=True)
    second.setup(resume=str(tmp_path))
    got_weights, got_optim = second.model.state_dict(), second.optimizer.state_dict()
    second.close()
    assert second.step == 2 and weights.keys() == got_weights.keys()
    assert all(torch.equal(weights[k], got_weights[k]) for k in weights)
    assert optim["param_groups"] == got_optim["param_groups"] and optim["state"].keys() == got_optim["state"].keys()
    for key, moments in optim["state"].items():
        assert all(torch.equal(t, got_optim["state"][key][name]) for name, t in moments.items()), key
    masters = [k for k in optim if k not in ("state", "param_groups")]  # MasterWeightAdamW's fp32 weights
    assert masters and all(torch.equal(a, b) for k in masters for a, b in zip(optim[k], got_optim[k], strict=True))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated tensors": (TENSORS_FILE, _truncate),
    "corrupt json": (JSON_FILE, lambda p: p.write_text(p.read_text()[:-40] + "}}")),
    "json of another format": (JSON_FILE, lambda p: p.write_text(json.dumps({"format": "x", "state": {}}))),
    "deleted tensors": (TENSORS_FILE, Path.unlink),
    "deleted json": (JSON_FILE, Path.unlink),
    "truncated model weights": ("model/model.safetensors", _truncate),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, parts, damage):
    name, hurt = DAMAGE[damage]
    _save(tmp_path, 1, parts, "one")
    _save(tmp_path, 2, parts, "two")
    bad = tmp_path / "checkpoints" / "step-2" / name
    hurt(bad)
    with pytest.warns(UserWarning, match=rf"{bad}.*not a complete checkpoint; resuming from .*step-1"):
        found, state = load_checkpoint(tmp_path)
    assert found.name == "step-1" and state["marker"] == "one"
    with pytest.raises(CheckpointError, match=rf"^--resume: {bad}"):  # named explicitly: no silent substitute
        load_checkpoint(bad.parent if name != "model/model.safetensors" else bad.parent.parent)
    hurt(tmp_path / "checkpoints" / "step-1" / name)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'checkpoints'} holds no complete step-N checkpoint"):
        load_checkpoint(tmp_path)


# -- no checkpoint file runs code -------------------------------------------------------------------------------------
class _Payload:
    """Unpickled, it creates the file `marker`: what a crafted checkpoint would do with os.system instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _fires(tmp_path: Path) -> None:
    """The payload is live: unpickled (plain, or by torch.load(weights_only=False) as the old code did) it creates its
    marker (here a control's), so the tests that it never appears are not vacuous."""
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()
    control.unlink()
    buffer = io.BytesIO()
    torch.save(_Payload(control), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)
    assert control.exists()


@pytest.mark.parametrize("where", [ckpt.LEGACY_STATE_FILE, JSON_FILE, TENSORS_FILE])
def test_a_checkpoint_carrying_a_pickle_payload_never_runs_it(tmp_path, parts, where):
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(marker))
    _fires(tmp_path)
    step = _save(tmp_path / "run", 1, parts, "one")
    if where == ckpt.LEGACY_STATE_FILE:  # an older dash's file, as torch.save writes it (loaded before with pickle)
        for name in (JSON_FILE, TENSORS_FILE):
            (step / name).unlink()
        torch.save({"step": 1, "x": _Payload(marker)}, step / where)
    else:
        (step / where).write_bytes(payload)
    with pytest.raises(CheckpointError, match=str(step / where)) as err:
        load_checkpoint(tmp_path / "run")
    assert not marker.exists()
    if where == ckpt.LEGACY_STATE_FILE:
        assert "older dash as a pickle" in str(err.value) and "--model.path" in str(err.value)


def test_dash_train_resume_of_a_crafted_checkpoint_exits_with_a_message(model_dir, tmp_path, capsys):  # noqa: F811
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    step = _save(run, 1, (build_tiny_model(seed=1), build_arith_tokenizer()), "one")
    for name in (JSON_FILE, TENSORS_FILE):
        (step / name).unlink()
    torch.save({"step": 1, "x": _Payload(marker)}, step / ckpt.LEGACY_STATE_FILE)
    for command in ("train", "eval"):
        assert cli_main([command, f"--model.path={model_dir}", "--model.device=cpu", f"--log.out_dir={run}",
                         f"--resume={run}"]) == 2
        assert f"{step / ckpt.LEGACY_STATE_FILE} was written by an older dash" in capsys.readouterr().err
    assert not marker.exists()


def _sharded(tmp_path: Path) -> Path:
    model = build_tiny_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 10, (2, 7))).float().sum().backward()
    opt.step()  # AdamW state and param_groups (the non-tensor values DCP stores as pickles)
    return save_sharded_checkpoint(tmp_path, 1, model, opt, {}, DistInfo(rank=0, world_size=1))


def test_a_sharded_checkpoint_still_loads_and_its_pickled_metadata_is_allow_listed(tmp_path):
    path = _sharded(tmp_path / "run")
    model = build_tiny_model(seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_sharded(path, model, opt)  # weights, AdamW moments and param_groups through the restricted readers
    assert opt.state_dict()["param_groups"][0]["betas"] == (0.9, 0.999) and len(opt.state_dict()["state"]) > 0
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(marker))
    _fires(tmp_path)
    (path / ckpt.SHARDED_DIR / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointError, match="refusing to load pathlib"):
        load_checkpoint(path)
    with pytest.raises(CheckpointException, match="refusing to load pathlib"):  # DCP wraps each rank's error
        load_sharded(path, build_tiny_model(seed=2))
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)  # a non-tensor value of a DCP checkpoint, as the stock planner unpickles it
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner().load_bytes(None, buffer)
    assert not marker.exists() and not isinstance(UnsafeCheckpointError("x"), CheckpointError)


_SAVER = """
import itertools, sys, time
import torch
from dash.rl.checkpoint import save_checkpoint
from dash.rl.warmstart import build_tiny_model
from dash.tokenizer import build_arith_tokenizer
model, tokenizer = build_tiny_model(seed=0), build_arith_tokenizer()
opt = torch.optim.AdamW(model.parameters())
model(torch.randint(0, 10, (1, 4))).float().sum().backward()
opt.step()
for step in itertools.count(int(sys.argv[2])):
    save_checkpoint(sys.argv[1], step, model, tokenizer, {"optimizer": opt.state_dict(), "marker": step})
    print(step, time.perf_counter(), flush=True)
"""


@pytest.mark.slow
def test_a_save_killed_at_a_random_point_leaves_a_checkpoint_that_resumes(tmp_path):
    """kill -9 of a process saving in a loop, at a seeded random point of a save (one round: a fresh process costs
    seconds of imports; the kill between the two renames is tested deterministically above)."""
    import subprocess
    import sys

    run, rng = tmp_path / "run", random.Random(0)
    for round_ in range(1):
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(run), str(1000 * round_ + 1)],
                                 stdout=subprocess.PIPE, text=True)
        (_, t1), (_, t2) = (map(float, saver.stdout.readline().split()) for _ in range(2))
        time.sleep(rng.uniform(0, t2 - t1))  # somewhere inside the third save
        saver.kill()
        saver.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a kill between renames warns, and is then resumed from the other one
            found, state = load_checkpoint(run)
        assert state["marker"] == int(found.name.removeprefix(".").removesuffix("-replaced")[5:])
        assert state["marker"] >= 1000 * round_ + 2 and len(state["optimizer"]["state"]) > 0
