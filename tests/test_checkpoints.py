"""Checkpoints (run_files.py): written atomically, the newest few kept, refused with one line
when bad, and `--resume` going on from them."""

import dataclasses
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    TINY,
    TINY_FLAGS,
    copy_script,
    files_of_at_most,
    resumed_trainer,
    run_main,
    run_python,
    start_in_own_session,
    wait_for,
)

import cli
import ppo_breakout
import run_files
from ppo_breakout import Trainer, settings
from run_files import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint, trainer_state

DIVERGING = ["--learning-rate", "1e10", "--lr-schedule", "constant"]  # Adam steps of 1e10: NaN within an update


def _equal_states(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_save_load_and_resume_go_on_from_the_saved_update(tmp_path):
    with Trainer(*settings(updates=3, **TINY)) as trainer:
        trainer.learning_rate.set_value(3e-4)  # a dashboard change must survive the resume
        trainer.run_training_loop(lambda stats, last: save_checkpoint(trainer, tmp_path, keep=2))
        saved_model = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        saved_optimizer = trainer.optimizer.state_dict()
        saved_rewards = list(trainer.episode_rewards)
    # keep the newest 2 only
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["update_0000002.pt", "update_0000003.pt"]
    path, state = load_checkpoint(tmp_path)
    assert path.name == "update_0000003.pt" and state["update"] == 3

    losses = []
    for _ in range(2):  # the same checkpoint resumed twice gives the same next-update losses
        with resumed_trainer(state, updates=4, **TINY) as resumed:
            assert resumed.update == 3 and resumed.env_steps == 3 * 32
            assert _equal_states(resumed.model.state_dict(), saved_model)
            assert _equal_states(resumed.optimizer.state_dict(), saved_optimizer)
            assert resumed.learning_rate() == pytest.approx(3e-4)
            assert list(resumed.episode_rewards) == saved_rewards
            resumed.run_training_loop()
            assert resumed.update == 4
            losses.append(resumed.train(resumed.sample()))
    assert losses[0] == losses[1]


def test_bad_checkpoints_give_one_line_errors(tmp_path, short_run):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    good = find_checkpoint(short_run)
    assert good.name == "update_0000004.pt"  # a run folder's newest
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="4 actions, but pong has 6"):
        load_checkpoint(good, game="pong")


def resume(folder, monkeypatch, *args) -> int:
    """`python ppo_breakout.py *args` in `folder`, its main() called here: these all stop at the
    flags, before anything starts."""
    monkeypatch.chdir(folder)
    return run_main(cli.main, *args)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--resume", "nowhere.pt"], "argument --resume: checkpoint not found: nowhere.pt"),
        (["--resume", "ppo_breakout.py"], "argument --resume: cannot read checkpoint ppo_breakout.py"),
    ],
)
def test_resume_from_a_bad_path_exits_2_with_one_line(script_dir, monkeypatch, capsys, args, message):
    assert resume(script_dir, monkeypatch, *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ppo_breakout.py: error: {message}"), lines
    assert not (script_dir / "logs").exists()


@pytest.mark.parametrize("updates", [[], ["--updates", "4"], ["--updates", "2"]])
def test_resume_with_nothing_left_to_train_exits_2_and_writes_no_run(short_run, monkeypatch, capsys, updates):
    # the short run ended at update 4, its --updates: resuming it needs a larger total
    folder = short_run.parents[2]
    runs = set(folder.glob("logs/ppo_breakout/*"))  # the fixture's folder is shared with other tests
    assert resume(folder, monkeypatch, "--resume", str(short_run), *updates) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "argument --updates:" in lines[0], lines
    assert "is not beyond the checkpoint's update 4" in lines[0], lines
    assert set(folder.glob("logs/ppo_breakout/*")) == runs


def test_resume_from_the_cli_continues_the_update_count_in_a_run_that_names_the_old_one(short_run):
    folder = short_run.parents[2]
    args = ["--resume", str(short_run), "--updates", "5", "--dashboard", "off"]
    result = run_python(folder, "ppo_breakout.py", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"continues run {short_run.name} from update 4" in result.stdout
    (new_run,) = [r for r in folder.glob("logs/ppo_breakout/*") if r != short_run]
    assert (new_run / "checkpoints" / "update_0000005.pt").exists()
    assert f"continues run {short_run.name}" in (new_run / "run.yaml").read_text()
    # the new run's metrics are the whole run's: the 4 updates it continues, then its own
    metrics = (new_run / "metrics.jsonl").read_text().splitlines()
    assert metrics[:4] == (short_run / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 5 and '"update": 5' in metrics[4]
    # its comment names the run it continues, once
    assert result.stdout.count(f"continues run {short_run.name} from update 4") == 1, result.stdout


def resumed_metrics(tmp_path, short_run, *flags) -> list:
    """The metrics of `--resume` from the short run's last checkpoint (update 4 of 4), to update 6,
    where the dashboard had changed three dynamic values before the checkpoint; and `flags`."""
    state = torch.load(find_checkpoint(short_run), weights_only=True)
    state["configs"].update(learning_rate=5e-4, epochs=3, clip_range=0.15)  # the dashboard's last
    folder = copy_script(tmp_path)
    torch.save(state, folder / "steered.pt")
    args = ["--resume", "steered.pt", "--updates", "6", "--dashboard", "off", *flags]
    result = run_python(folder, "ppo_breakout.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = folder.glob("logs/ppo_breakout/*")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_flags_given_with_resume_win_over_the_checkpoints_dynamic_values(tmp_path, short_run):
    records = resumed_metrics(tmp_path, short_run, "--learning-rate", "1e-4", "--epochs", "2", "--clip-range", "0.2")
    assert [r["update"] for r in records] == [5, 6]
    # the linear schedule scales the given rate: update u (from 0) of 6 trains at 1e-4 * (1 - u / 6)
    assert [r["learning_rate"] for r in records] == pytest.approx([1e-4 * 2 / 6, 1e-4 * 1 / 6])
    assert [(r["epochs"], r["clip_range"]) for r in records] == [(2, 0.2), (2, 0.2)]


def test_without_flags_a_resume_goes_on_with_the_checkpoints_dynamic_values(tmp_path, short_run):
    records = resumed_metrics(tmp_path, short_run)
    assert [r["learning_rate"] for r in records] == pytest.approx([5e-4 * 2 / 6, 5e-4 * 1 / 6])
    assert [(r["epochs"], r["clip_range"]) for r in records] == [(3, 0.15), (3, 0.15)]


def test_sigkill_while_writing_checkpoints_leaves_a_loadable_checkpoint(script_dir):
    args = ["--updates", "100000", *TINY_FLAGS, "--batches", "1", "--checkpoint-every", "1", "--dashboard", "off"]
    process = subprocess.Popen(
        [sys.executable, "ppo_breakout.py", *args],
        cwd=script_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(list(script_dir.glob("logs/*/*/checkpoints/*.pt"))) >= 3, 120, "3 checkpoints")
        time.sleep(0.37)  # a moment somewhere inside a later update or checkpoint write, not an event
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    (run,) = script_dir.glob("logs/ppo_breakout/*")
    path, state = load_checkpoint(run)
    assert state["update"] >= 3


def test_a_checkpoint_that_cannot_be_written_ends_the_run_with_one_line_and_keeps_the_metrics(script_dir):
    # a checkpoint is ~20 MB, metrics far less
    args = ["--updates", "6", *TINY_FLAGS, "--checkpoint-every", "2", "--dashboard", "off"]
    process = start_in_own_session(script_dir, "ppo_breakout.py", *args, preexec_fn=files_of_at_most(2**20))
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (run,) = script_dir.glob("logs/ppo_breakout/*")
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == (
        f"error: cannot write {run / 'checkpoints' / 'update_0000002.pt'}: File too large; "
        f"no checkpoint yet (one every 2 updates); the metrics are in {run}"
    ), last_line
    assert not list((run / "checkpoints").iterdir()), "the partial file is removed"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # and its workers went with it: the no_process_left check after each test sees any that did not


def test_a_resume_takes_the_run_settings_from_its_command_line_not_from_the_checkpoint(tmp_path, short_run):
    # a checkpoint of a torchrun job on GPU 1 (written before the settings were split, when it held
    # the machine's settings too), resumed alone on this CPU machine
    state = torch.load(find_checkpoint(short_run), weights_only=True)
    state["configs"].update(device="cuda:1", cuda_graphs=False, checkpoint_every=1, keep_checkpoints=9)
    folder = copy_script(tmp_path)
    torch.save(state, folder / "gpu_rank.pt")
    result = run_python(folder, "ppo_breakout.py", "--resume", "gpu_rank.pt", "--updates", "6", "--dashboard", "off")
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = folder.glob("logs/ppo_breakout/*")
    # checkpoint_every is this command line's default, 50, not the checkpoint's 1: only the last
    assert [c.name for c in (run / "checkpoints").glob("*.pt")] == ["update_0000006.pt"]
    written = torch.load(run / "checkpoints" / "update_0000006.pt", weights_only=True)
    assert set(written["configs"]) == {f.name for f in dataclasses.fields(ppo_breakout.Configs)}
    assert written["model"]["conv1.weight"].device.type == "cpu"


def test_only_the_trainers_own_cuda_generator_is_saved_and_restored(monkeypatch):
    # a checkpoint written where 8 GPUs were visible held 8 states; one GPU's machine has 1
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(("all", len(states))))
    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    run_files.set_cuda_rng_state(eight, torch.device("cuda:0"))
    assert len(restored) == 1 and torch.equal(restored[0][0], eight[0]) and restored[0][1] == torch.device("cuda:0")
    # on the CPU nothing is restored, from either kind of checkpoint, and nothing is saved
    restored.clear()
    run_files.set_cuda_rng_state(eight, torch.device("cpu"))
    run_files.set_cuda_rng_state(torch.zeros(0, dtype=torch.uint8), torch.device("cpu"))
    assert restored == [] and run_files.cuda_rng_state(torch.device("cpu")).numel() == 0
    with Trainer(*settings(updates=1, **TINY)) as trainer:
        state = trainer_state(trainer)
    state["cuda_rng"] = eight  # as the 8-GPU machine wrote it, before
    with resumed_trainer(state, **TINY) as resumed:
        assert resumed.update == 0 and restored == []


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _diverged_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "diverged" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_a_run_that_diverges_ends_with_one_line_and_exit_1_before_any_checkpoint(script_dir):
    args = ["--updates", "3", *TINY_FLAGS, *DIVERGING, "--checkpoint-every", "1", "--dashboard", "off"]
    result = run_python(script_dir, "ppo_breakout.py", *args)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = _diverged_line(result.stderr)
    assert "update 1 diverged" in line and "nothing of it was kept" in line, line
    (run,) = script_dir.glob("logs/ppo_breakout/*")
    assert not list(run.glob("checkpoints/*")), "the NaN weights were kept"
    assert not (run / "metrics.jsonl").exists(), "nor the update's metrics"


def test_a_resumed_run_that_diverges_keeps_the_checkpoint_it_resumed_from_and_names_it(tmp_path, short_run):
    checkpoint = short_run / "checkpoints" / "update_0000004.pt"
    before = _digest(checkpoint)
    folder = copy_script(tmp_path)  # not short_run's folder: other tests count its runs
    args = ["--resume", str(short_run), "--updates", "6", *DIVERGING, "--checkpoint-every", "1", "--dashboard", "off"]
    result = run_python(folder, "ppo_breakout.py", *args)
    assert result.returncode == 1, result.stderr[-3000:]
    line = _diverged_line(result.stderr)
    assert "update 5 diverged" in line and "nothing of it was kept" in line, line
    assert line.endswith(f"the checkpoint it resumed from stays: {checkpoint}"), line
    assert _digest(checkpoint) == before
    assert not list(tmp_path.rglob("update_0000005.pt")) and not list(short_run.rglob("update_0000005.pt"))


def _with_a_nan_weight(short_run, path):
    state = torch.load(find_checkpoint(short_run), weights_only=True)
    state["model"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)
    return path


@pytest.mark.parametrize("command", ["export", "evaluate", "--resume"])
def test_a_checkpoint_with_weights_that_are_not_finite_is_refused_in_one_line(
    tmp_path, short_run, monkeypatch, capsys, command
):
    bad = _with_a_nan_weight(short_run, tmp_path / "diverged.pt")
    out = tmp_path / "policy.pt"
    args = {
        "export": ["export", str(bad), str(out)],
        "evaluate": ["evaluate", str(bad), "--episodes", "1"],
        "--resume": ["--resume", str(bad)],
    }[command]
    assert resume(copy_script(tmp_path), monkeypatch, *args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not finite numbers" in lines[0] and str(bad) in lines[0], lines
    assert not out.exists() and not (tmp_path / "logs").exists(), "nothing written, no run started"


def _metrics_of_the_first_updates(short_run, tmp_path, after) -> tuple:
    """A run folder under `tmp_path` with short_run's checkpoint of update 2 and its metrics of
    updates 1 and 2 followed by `after`; the folder to resume from and those two records."""
    old = tmp_path / "old_run"
    (old / "checkpoints").mkdir(parents=True)
    checkpoint = short_run / "checkpoints" / "update_0000002.pt"
    (old / "checkpoints" / checkpoint.name).write_bytes(checkpoint.read_bytes())
    records = (short_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (old / "metrics.jsonl").write_text("".join(records[:2]) + after)
    return old, records[:2]


def test_a_cut_last_line_of_the_metrics_is_dropped_on_resume_in_one_line(tmp_path, short_run):
    third = (short_run / "metrics.jsonl").read_text().splitlines()[2]
    old, first = _metrics_of_the_first_updates(short_run, tmp_path, third[: len(third) // 2])  # killed mid-write
    folder = copy_script(tmp_path)
    result = run_python(folder, "ppo_breakout.py", "--resume", str(old), "--updates", "3", "--dashboard", "off")
    assert result.returncode == 0, result.stderr[-3000:]
    dropped = [line for line in result.stdout.splitlines() if line.startswith("Dropped the cut last line of")]
    assert len(dropped) == 1 and str(old / "metrics.jsonl") in dropped[0], result.stdout[-3000:]
    (run,) = folder.glob("logs/ppo_breakout/*")
    metrics = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert metrics[:2] == first and len(metrics) == 3 and json.loads(metrics[2])["update"] == 3


def test_a_bad_line_inside_the_metrics_refuses_the_resume_in_one_line(tmp_path, short_run, monkeypatch, capsys):
    old, _ = _metrics_of_the_first_updates(short_run, tmp_path, "")
    lines = (old / "metrics.jsonl").read_text().splitlines(keepends=True)
    (old / "metrics.jsonl").write_text(lines[0] + "garbage\n" + lines[1])
    folder = copy_script(tmp_path)
    assert resume(folder, monkeypatch, "--resume", str(old), "--updates", "3", "--dashboard", "off") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ppo_breakout.py: error: argument --resume: ") and "line 2 " in line, line
    assert str(old / "metrics.jsonl") in line and "garbage" in line, line
    assert not (folder / "logs").exists()


def test_a_resume_into_another_game_starts_new_games_and_says_so(tmp_path, short_run):
    folder = copy_script(tmp_path)
    args = ["--resume", str(short_run), "--updates", "5", "--game", "atlantis", "--dashboard", "off"]  # 4 actions too
    result = run_python(folder, "ppo_breakout.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    why = "Starting new games, not the checkpoint's: they are games of breakout, this run plays atlantis"
    assert why in result.stdout.splitlines(), result.stdout[-3000:]
    (run,) = folder.glob("logs/ppo_breakout/*")
    written = torch.load(run / "checkpoints" / "update_0000005.pt", weights_only=True)
    assert written["configs"]["game"] == "atlantis"


NUMBERS = ["update_9999998.pt", "update_9999999.pt", "update_10000000.pt"]  # by name, 10000000 sorts first


def _checkpoint_files(folder, names=NUMBERS):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return [folder / name for name in names]


def test_checkpoints_are_found_and_rotated_by_update_number_not_name(tmp_path):
    files = _checkpoint_files(tmp_path / "checkpoints")
    assert run_files.by_update(reversed(files)) == files
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "update_10000000.pt"
    with Trainer(*settings(**TINY)) as trainer:
        trainer.update = 10_000_001
        save_checkpoint(trainer, tmp_path, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["update_10000000.pt", "update_10000001.pt"]


def test_the_last_checkpoint_a_run_left_behind_is_its_highest_update(tmp_path, monkeypatch):
    _checkpoint_files(tmp_path / "checkpoints")
    labml_run = SimpleNamespace(run=SimpleNamespace(run_path=str(tmp_path)))
    monkeypatch.setattr(run_files, "experiment_singleton", lambda: labml_run)
    run = run_files.RunFolder(ppo_breakout.RunSettings())
    run.updates_kept = 1
    last = tmp_path / "checkpoints" / "update_10000000.pt"
    assert run.left_behind() == f"the last checkpoint is {last}; the metrics are in {tmp_path}"


def test_a_torchrun_jobs_newest_checkpoint_is_its_highest_update_over_its_run_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(run_files.lab, "get_experiments_path", lambda: str(tmp_path))
    for run, names in [("first", NUMBERS[:2]), ("restarted", NUMBERS[2:]), ("other_job", ["update_10000005.pt"])]:
        _checkpoint_files(tmp_path / "ppo_breakout" / run / "checkpoints", names)
        (tmp_path / "ppo_breakout" / run / run_files.JOB_FILE).write_text("other" if run == "other_job" else "job")
    assert run_files.job_checkpoint("job") == str(tmp_path / "ppo_breakout" / "restarted" / "checkpoints" / NUMBERS[2])


def test_a_resumed_loose_checkpoint_file_is_named_as_a_file_not_a_run(tmp_path, short_run):
    folder = copy_script(tmp_path)
    loose = folder / "loose.pt"  # not in a run's checkpoints/ folder
    loose.write_bytes((short_run / "checkpoints" / "update_0000004.pt").read_bytes())
    result = run_python(folder, "ppo_breakout.py", "--resume", str(loose), "--updates", "5", "--dashboard", "off")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = folder.glob("logs/ppo_breakout/*")
    comment = (run / "run.yaml").read_text()
    assert f"continues a checkpoint file from update 4 ({loose})" in comment, comment
    assert "continues run" not in comment and "continues run" not in result.stdout


def test_atomic_save_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    path, synced, fsync = tmp_path / "update_0000001.pt", [], os.fsync

    def recording(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), path.exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    run_files.atomic_save({"update": 1}, path)
    assert synced == [(False, False), (True, True)]  # the file before the rename, then its folder


def test_a_second_ctrl_c_while_a_checkpoint_is_written_leaves_no_tmp_file_and_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "update_0000001.pt"
    run_files.atomic_save({"update": 1}, path)
    before = _digest(path)

    def interrupted(state, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_files.atomic_save({"update": 2}, path)
    assert list(tmp_path.iterdir()) == [path] and _digest(path) == before


def test_a_resume_records_its_run_settings_and_says_which_differ_from_the_runs(tmp_path):
    folder = copy_script(tmp_path)
    args = ["--updates", "2", *TINY_FLAGS, "--dashboard", "off"]
    first = run_python(folder, "ppo_breakout.py", *args, "--precision", "fp32", "--checkpoint-every", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    (old,) = folder.glob("logs/ppo_breakout/*")
    recorded = torch.load(old / "checkpoints" / "update_0000002.pt", weights_only=True)["run_settings"]
    assert recorded["precision"] == "fp32" and recorded["device"] == "cpu" and recorded["checkpoint_every"] == 1
    assert recorded["train_threads"] >= 1  # 0 recorded as the count it took: torch's threads
    resume = ["--resume", str(old), "--updates", "3", "--precision", "bf16", "--train-threads", "3"]
    result = run_python(folder, "ppo_breakout.py", *resume)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if "Run settings that differ" in line]
    assert line.startswith("Run settings that differ from the run this continues: "), line
    assert "precision: fp32 in the run, bf16 now" in line and "checkpoint_every: 1 in the run, 50 now" in line, line
    assert f"train_threads: {recorded['train_threads']} in the run, 3 now" in line, line
    assert "device" not in line, line  # the same cpu
    (new,) = [r for r in folder.glob("logs/ppo_breakout/*") if r != old]
    written = torch.load(new / "checkpoints" / "update_0000003.pt", weights_only=True)
    assert written["run_settings"]["precision"] == "bf16"  # this command line's, not applied from the run's
    run_setting_names = {f.name for f in dataclasses.fields(ppo_breakout.RunSettings)}
    assert not set(written["configs"]) & run_setting_names


def test_a_resume_names_the_run_settings_its_checkpoints_version_did_not_keep():
    with Trainer(*settings(train_threads=2, **TINY)) as trainer:
        now = run_files.effective_run_settings(trainer)
        older = {name: value for name, value in now.items() if name != "train_threads"}
        assert run_files.run_settings_changes({"run_settings": older}, trainer) == [
            "train_threads: not kept by the run's version, 2 now"
        ]
        assert run_files.run_settings_changes({"run_settings": now}, trainer) == []
        assert run_files.run_settings_changes({}, trainer) == []  # a checkpoint from before any were kept
