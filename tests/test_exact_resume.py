"""Exact resume: a run resumed from its own checkpoint at update k is the run it continues, games in
progress included, and its folder holds the whole run's metrics."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY, copy_script, flags, run_python, start_in_own_session, wait_for

# long enough for lost lives and ended games on both sides of the checkpoint at update 4
CONFIG = flags(dict(TINY, worker_steps=64, updates=8))
ARGS = [*CONFIG, "--checkpoint-every", "4", "--keep-checkpoints", "5", "--dashboard", "off"]
TIMING = ("time", "steps_per_second")  # the only figures that differ between two runs of one machine


def run_folder(folder: Path, before: set = frozenset()) -> Path:
    (run,) = set(folder.glob("logs/ppo_breakout/*")) - set(before)
    return run


def metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list) -> list:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_same_state(a, b, where="checkpoint"):
    """Bit for bit: every tensor equal, every number and string the same."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def final_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "update_0000008.pt", weights_only=True)


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def resume_and_compare(folder: Path, whole: Path, checkpoint: Path, *run_flags, launcher=()):
    """Resume `checkpoint` (update 4) to update 8 and check the run ends as `whole` did; `launcher`:
    what runs ppo_breakout.py (python's arguments before it, such as torchrun's)."""
    runs = set(folder.glob("logs/ppo_breakout/*"))
    args = ["--resume", str(checkpoint), "--dashboard", "off", *run_flags]
    result = run_python(folder, *launcher, "ppo_breakout.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Starting new games" not in result.stdout
    resumed = run_folder(folder, runs)
    # the same weights, Adam state, counters, random state and games in progress, bit for bit; the
    # run settings beside them are each command line's own, recorded and never applied
    ours, theirs = final_checkpoint(resumed), final_checkpoint(whole)
    assert ours.pop("run_settings")["checkpoint_every"] == 50 and theirs.pop("run_settings")["checkpoint_every"] == 4
    assert_same_state(ours, theirs)
    # the same losses, KL, scores and lengths after update 4, with games that ended among them
    after = [r for r in metrics(whole) if r["update"] > 4]
    assert without_timing(metrics(resumed)[4:]) == without_timing(after)
    assert any(r["games"] for r in after), "a game ended after the checkpoint"
    return resumed


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_run_resumed_from_its_checkpoint_ends_as_the_run_did_bit_for_bit(tmp_path, precision):
    folder = copy_script(tmp_path)
    result = run_python(folder, "ppo_breakout.py", *ARGS, "--precision", precision)
    assert result.returncode == 0, result.stderr[-2000:]
    whole = run_folder(folder)
    resumed = resume_and_compare(folder, whole, whole / "checkpoints" / "update_0000004.pt", "--precision", precision)
    # the resumed run's folder holds the whole run: the first 4 updates are the run it continues
    assert metrics(resumed)[:4] == metrics(whole)[:4]
    assert [r["update"] for r in metrics(resumed)] == list(range(1, 9))
    assert (resumed / "curve.png").exists()
    assert f"continues run {whole.name} from update 4" in (resumed / "run.yaml").read_text()


def test_two_torchrun_ranks_resumed_from_their_checkpoint_end_as_the_job_did(tmp_path):
    folder = copy_script(tmp_path)
    result = run_python(folder, *TORCHRUN, "ppo_breakout.py", *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    whole = run_folder(folder)
    assert "distributed_world_size: 2" in (whole / "run.yaml").read_text()
    # every rank's games and random state are in rank 0's checkpoint
    assert [len(rank["games"]) for rank in final_checkpoint(whole)["ranks"]] == [TINY["n_workers"]] * 2
    resume_and_compare(folder, whole, whole / "checkpoints" / "update_0000004.pt", launcher=TORCHRUN)


def test_a_run_killed_after_its_checkpoint_and_resumed_is_the_run_that_was_not_killed(tmp_path):
    folder = copy_script(tmp_path)
    result = run_python(folder, "ppo_breakout.py", *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    whole = run_folder(folder)
    runs = {whole}
    killed = start_in_own_session(folder, "ppo_breakout.py", *ARGS)
    try:
        wait_for(
            lambda: list(folder.glob("logs/ppo_breakout/*/checkpoints/update_0000004.pt"))
            != [whole / "checkpoints" / "update_0000004.pt"],
            300,
            "the checkpoint at update 4",
        )
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    killed_run = run_folder(folder, runs)
    assert not (killed_run / "checkpoints" / "update_0000008.pt").exists(), "killed before its end"
    resume_and_compare(folder, whole, killed_run)  # the folder: its newest checkpoint, update 4


def test_a_checkpoint_without_games_resumes_with_new_games_and_says_so(tmp_path):
    folder = copy_script(tmp_path)
    result = run_python(folder, "ppo_breakout.py", *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    whole = run_folder(folder)
    state = torch.load(whole / "checkpoints" / "update_0000004.pt", weights_only=True)
    del state["ranks"]  # as a checkpoint written before games were saved
    torch.save(state, folder / "old.pt")
    result = run_python(folder, "ppo_breakout.py", "--resume", "old.pt", "--dashboard", "off")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "Starting new games" in line]
    assert lines == ["Starting new games, not the checkpoint's: it holds none (it was written before games were saved)"]
    # a different number of workers cannot take the checkpoint's games either
    args = ["--resume", str(whole), "--updates", "9", "--n-workers", "3", "--dashboard", "off"]
    result = run_python(folder, "ppo_breakout.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Starting new games, not the checkpoint's: its games are 1 rank(s) x 2 workers, this run's 1 x 3" in (
        result.stdout
    )
