"""Run folders (dash/rl/run_dir.py): a run never overwrites, interleaves with or loses another's work. A second run into
a folder that holds one is refused unless --resume or --overwrite; two at once: the second fails at once naming the
first's pid; an unwritable folder fails before step 1; a resumed run's metrics hold every step once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dash.cli import main as cli_main
from dash.rl.run_dir import RunDirError, claim_run_dir
from dash.rl.trainer import Trainer
from tests.rl.test_trainer_e2e import _cfg, model_dir  # noqa: F401  (model_dir: a fixture used below)


def _logged_steps(out_dir, kind="time/step_s"):
    return [r["step"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if kind in r]


def _cli_train(model_dir, out_dir, steps, *extra):  # noqa: F811
    return cli_main(["train", f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=8",
                     "--data.reward=test_even_length", "--sampling.max_new_tokens=5", "--train.prompts_per_step=4",
                     "--train.micro_batch_size=4", f"--train.steps={steps}", f"--log.out_dir={out_dir}",
                     "--log.eval_every=0", "--log.ckpt_every=2", *extra])


@pytest.mark.slow
def test_a_second_run_into_a_used_folder_needs_resume_or_overwrite(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert _cli_train(model_dir, out, 2) == 0
    (out / "sft").mkdir()  # not the run's: --overwrite keeps it
    assert _cli_train(model_dir, out, 2) == 2
    err = capsys.readouterr().err
    assert f"log.out_dir {out} already holds a run" in err and f"--resume {out}" in err and "--overwrite" in err
    assert _logged_steps(out) == [1, 2]  # untouched
    assert _cli_train(model_dir, out, 3, "--overwrite") == 0
    assert _logged_steps(out) == [1, 2, 3] and (out / "sft").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-2", "step-3"]
    assert _cli_train(model_dir, out, 4, f"--resume={out}") == 0
    assert _logged_steps(out) == [1, 2, 3, 4]


def test_an_evaluation_before_training_is_not_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/greedy_acc": 0.5}) + "\n")
    claim_run_dir(tmp_path).release()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    with pytest.raises(RunDirError, match="logged training steps in"):
        claim_run_dir(tmp_path)
    claim_run_dir(tmp_path, overwrite=True).release()
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_runs_at_once_the_second_fails_at_once_naming_the_first(model_dir, tmp_path, monkeypatch):  # noqa: F811
    hold = (f"import sys; from dash.rl.run_dir import claim_run_dir; held = claim_run_dir({str(tmp_path)!r}); "
            "print('locked', flush=True); sys.stdin.read()")  # `held`: the lock lives as long as its RunDir
    holder = subprocess.Popen([sys.executable, "-c", hold],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "locked"
        import dash.model_io

        monkeypatch.setattr(dash.model_io, "load_model", lambda *a, **k: pytest.fail("weights loaded before the lock"))
        with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid}\)"):
            Trainer(_cfg(model_dir, tmp_path), quiet=True).setup()
    finally:
        holder.communicate("")  # the holder exits; the kernel drops its lock
    claim_run_dir(tmp_path).release()  # the lock file left behind blocks nothing


def test_the_lock_is_held_until_close(tmp_path):
    first = claim_run_dir(tmp_path)
    with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
        claim_run_dir(tmp_path)
    first.release()
    claim_run_dir(tmp_path).release()


def test_an_unwritable_checkpoint_folder_fails_at_set_up(model_dir, tmp_path, monkeypatch):  # noqa: F811
    import dash.model_io

    monkeypatch.setattr(dash.model_io, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    (tmp_path / "checkpoints").write_text("a file where the folder should be")  # fails as root too
    with pytest.raises(RunDirError, match=rf"cannot write in {tmp_path / 'checkpoints'} .*checkpoints and metrics"):
        Trainer(_cfg(model_dir, tmp_path), quiet=True).setup()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode bit; the case above covers root")
def test_a_read_only_checkpoint_folder_fails_at_set_up(tmp_path):
    (tmp_path / "checkpoints").mkdir(mode=0o500)
    with pytest.raises(RunDirError, match=r"cannot write in .*checkpoints \(Permission denied\)"):
        claim_run_dir(tmp_path)


@pytest.mark.slow
def test_a_resume_from_an_earlier_checkpoint_logs_each_step_once(model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert _cli_train(model_dir, out, 4, "--log.eval_every=3") == 0  # checkpoints at steps 2 and 4
    assert _logged_steps(out) == [1, 2, 3, 4] and _logged_steps(out, "eval/heldout/greedy_acc") == [3, 4]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "time/st')  # the torn last line of a run killed mid-write
    with pytest.warns(UserWarning, match="dropped 1 unreadable line"):
        assert _cli_train(model_dir, out, 4, f"--resume={out / 'checkpoints' / 'step-2'}", "--log.eval_every=3") == 0
    assert _logged_steps(out) == [1, 2, 3, 4] and _logged_steps(out, "eval/heldout/greedy_acc") == [3, 4]
    assert _cli_train(model_dir, out, 5, f"--resume={out}") == 0  # from the latest (step 4)
    assert _logged_steps(out) == [1, 2, 3, 4, 5]


def test_overwrite_never_deletes_the_checkpoint_it_resumes(tmp_path):
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(RunDirError, match="--overwrite would delete the checkpoint --resume continues"):
        claim_run_dir(tmp_path, resume=tmp_path / "checkpoints" / "step-2", resume_step=2, overwrite=True)
    assert (tmp_path / "checkpoints" / "step-2").is_dir()
