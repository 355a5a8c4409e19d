"""Checkpoint publishing (dash/rl/checkpoint.py): whatever point a save is killed at, `--resume` finds a complete
checkpoint, and left-over temporary folders are cleaned up by the next save."""

from __future__ import annotations

import pytest

import dash.rl.checkpoint as ckpt
from dash.rl.checkpoint import find_checkpoint, save_checkpoint
from dash.tasks.warmstart import build_tiny_model
from dash.tokenizer import build_arith_tokenizer


@pytest.fixture(scope="module")
def parts():
    return build_tiny_model(seed=0), build_arith_tokenizer()


def _save(run, step, parts, marker):
    return save_checkpoint(run, step, *parts, {"marker": marker})


def _marker(path):
    import torch

    return torch.load(path / ckpt.STATE_FILE, weights_only=False)["marker"]


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
    (root / "step-1" / ckpt.STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no complete step-N"):
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
