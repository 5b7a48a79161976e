"""`python ppo_breakout.py`: bad input refused before anything starts, a run's files, and how a run
ends: a dead worker, Ctrl-C, SIGTERM, a terminal's hang-up, nohup."""

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    LONG_RUN,
    ROOT,
    TINY,
    TINY_FLAGS,
    assert_gone,
    checkpointed_last_update,
    ctrl_c,
    descendants,
    flags,
    hang_up_after_first_update,
    metrics_files,
    read_until,
    run_main,
    run_python,
    start_in_own_session,
    wait_for,
    wait_for_first_update,
)

import cli

# a number that is not finite, in any float flag: before, inf slipped past the checks of range (inf >= 0:
# a learning rate of inf started a run) and nan was refused as out of range, or not at all. Given as
# FLAG=VALUE: after a space, argparse takes -inf for a flag of its own ("expected one argument")
NON_FINITE = [
    ("--learning-rate", "inf"),
    ("--adam-eps", "nan"),
    ("--value-loss-coef", "inf"),
    ("--entropy-bonus-coef", "-inf"),
    ("--clip-range", "nan"),
    ("--gamma", "inf"),
    ("--lambda", "nan"),
    ("--max-grad-norm", "inf"),
]
WORKER_TIMEOUTS = ["0", "-1", "inf", "nan"]  # a run whose hung worker is never noticed, or at once
BAD_INPUTS = [
    (["--updates", "0"], "--updates", "positive"),
    (["--epochs", "-1"], "--epochs", "positive"),
    (["--n-workers", "0"], "--n-workers", "positive"),
    (["--worker-steps", "0"], "--worker-steps", "positive"),
    (["--batches", "0"], "--batches", "positive"),
    (["--batches", "3"], "--batches", "does not divide"),
    (["--backend", "mpi"], "--backend", "must be auto, gloo or nccl, got 'mpi'"),
    (["--n-workers", "3", "--worker-steps", "10", "--batches", "4"], "--batches", "does not divide"),
    (["--learning-rate", "-0.001"], "--learning-rate", "negative"),
    (["--value-loss-coef", "-1"], "--value-loss-coef", "negative"),
    (["--entropy-bonus-coef", "-0.01"], "--entropy-bonus-coef", "negative"),
    (["--clip-range", "0"], "--clip-range", "(0, 1)"),
    (["--clip-range", "1.5"], "--clip-range", "(0, 1)"),
    (["--game", "not_a_game"], "--game", "not_a_game"),
    (["--device", "tpu"], "--device", "tpu"),
    (["--updates", "many"], "--updates", "invalid int value"),
    (["--rollout-threads", "-1"], "--rollout-threads", "0 or more"),
    (["--train-threads", "-1"], "--train-threads", "0 or more, got -1"),
    # 32 samples in 2 minibatches of 16: a share of a minibatch must hold a sample
    (
        ["--n-workers", "2", "--worker-steps", "16", "--batches", "2", "--train-threads", "17"],
        "--train-threads",
        "at most a minibatch's 16 samples, got 17",
    ),
    (["--seed", "-1"], "--seed", "0 or more"),
    (["--seed", str(2**64)], "--seed", "less than 2**64"),
    (["--dashboard", "localhost:5005"], "--dashboard", "http(s) URL"),
    (["--dashboard", "http://localhost:port"], "--dashboard", "http(s) URL"),
    # more than any machine here holds: refused before a worker starts (was an allocator traceback;
    # 100,000 workers would have been started)
    (["--worker-steps", "10000000"], "--worker-steps", "GiB of memory"),
    (["--n-workers", "100000"], "--n-workers", "worker processes need about"),
    (["--rollout-threads", str(os.cpu_count() + 1)], "--rollout-threads", f"{os.cpu_count()} CPUs"),
    *[([f"{flag}={value}"], flag, f"must be a finite number, got {value} (see --help)") for flag, value in NON_FINITE],
    # 32 samples in 32 minibatches: one sample has no standard deviation to normalise its advantage by
    (["--n-workers", "2", "--worker-steps", "16", "--batches", "32"], "--batches", "minibatches of 1 sample: need 2"),
    *[(["--worker-timeout", t], "--worker-timeout", "must be a positive number of seconds") for t in WORKER_TIMEOUTS],
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["--device", "cuda"], "--device", "CUDA is not available"))


@pytest.mark.parametrize("args,flag,problem", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_flag_and_starts_nothing(script_dir, monkeypatch, capsys, args, flag, problem):
    # the entry point's own main(), called here: the command line below shows it is the script's
    monkeypatch.chdir(script_dir)
    assert run_main(cli.main, *args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, the problem's
    assert line.startswith(f"ppo_breakout.py: error: argument {flag}: ") and problem in line, line
    assert not (script_dir / "logs").exists(), "no run folder may be written"


# where ale-py looks for its ROMs: ALE_ROMS_DIR, a folder without breakout.bin or no folder at all
# (before: ale-py's FileNotFoundError or NotADirectoryError, a traceback and exit 1, in both commands)
ROM_FOLDERS = ["an empty folder", "a folder that does not exist"]
ROM_COMMANDS = {
    "training": ("ppo_breakout.py", ["--updates", "1", *TINY_FLAGS, "--dashboard", "off"]),
    "evaluate": ("ppo_breakout.py evaluate", ["evaluate", str(ROOT / "models" / "breakout_10m.pt"), "--episodes", "1"]),
}


@pytest.mark.parametrize("command", ROM_COMMANDS)
@pytest.mark.parametrize("folder", ROM_FOLDERS)
def test_a_missing_rom_is_one_line_naming_the_game_and_where_ale_py_looked(script_dir, monkeypatch, folder, command):
    roms = script_dir / "roms"
    if folder == "an empty folder":
        roms.mkdir()
    monkeypatch.setenv("ALE_ROMS_DIR", str(roms))  # the program's environment, as a user's shell sets it
    prog, args = ROM_COMMANDS[command]
    result = run_python(script_dir, "ppo_breakout.py", *args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"{prog}: error: "), line
    assert f"no usable ROM of breakout where ale-py looked (ALE_ROMS_DIR={roms})" in line, line
    assert not (script_dir / "logs").exists(), "no run folder may be written"


def test_bad_input_on_the_command_line_is_one_line_and_exit_2(script_dir):
    result = run_python(script_dir, "ppo_breakout.py", "--updates", "0", "--seed", "-1", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # every problem, one line each, without argparse's usage block; the last says where to look
    assert lines == [
        "ppo_breakout.py: error: argument --updates: must be a positive integer, got 0",
        "ppo_breakout.py: error: argument --seed: must be 0 or more, got -1 (see --help)",
    ]
    result = run_python(script_dir, "ppo_breakout.py", "--updates", "many", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ppo_breakout.py: error: argument --updates: invalid int value: 'many' (see --help)"
    ]
    assert not (script_dir / "logs").exists()


def test_help_shows_every_flag_with_its_default(script_dir):
    out = run_python(script_dir, "ppo_breakout.py", "--help", timeout=60).stdout.split("options:", 1)[1]
    for flag, default in [
        ("--updates", "10000"),
        ("--epochs", "4"),
        ("--lr-schedule", "linear"),
        ("--n-workers", "8"),
        ("--worker-steps", "128"),
        ("--batches", "4"),
        ("--value-loss-coef", "0.5"),
        ("--entropy-bonus-coef", "0.01"),
        ("--clip-range", "0.1"),
        ("--learning-rate", "0.001"),
        ("--gamma", "0.99"),
        ("--lambda", "0.95"),
        ("--seed", "1"),
        ("--game", "breakout"),
        ("--device", "auto"),
    ]:
        assert flag in out
        line = " ".join(out.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0].split())
        assert f"(default: {default})" in line, (flag, line)


def test_help_shows_the_algorithms_settings_apart_from_the_runs(script_dir):
    out = run_python(script_dir, "ppo_breakout.py", "--help", timeout=60).stdout
    algorithm, run = out.split("the algorithm's settings:", 1)[1].split("the run's settings:", 1)

    def lists(text: str, flag: str) -> bool:
        return re.search(rf"^  {flag}[ ,]", text, flags=re.M) is not None

    for flag in ("--updates", "--epochs", "--learning-rate", "--seed", "--game", "--clip-rewards"):
        assert lists(algorithm, flag) and not lists(run, flag), flag
    for flag in ("--device", "--precision", "--cuda-graphs", "--checkpoint-every", "--device-ids", "--resume"):
        assert lists(run, flag) and not lists(algorithm, flag), flag


def test_importing_the_modules_starts_nothing(tmp_path):
    code = (
        "import ppo_breakout, cli, run_files, plots, evaluate, dashboard, bench, multiprocessing; "
        "assert not multiprocessing.active_children(); print('ok')"
    )
    result = run_python(ROOT, "-c", code, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
    assert not (tmp_path / "logs").exists()


def test_a_short_run_finishes_and_writes_its_metrics_and_checkpoints(short_cli_run):
    run, result = short_cli_run.run, short_cli_run.result
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2, 3, 4]
    assert [r["env_steps"] for r in records] == [32, 64, 96, 128]
    # one short progress line a person reads (into a file: the first update's and the last one's),
    # then the last line; the full metrics are labml's and metrics.jsonl's
    progress = [line for line in result.stdout.splitlines() if line.startswith("update ")]
    assert progress[0].startswith("update 1 of 4  32 env steps  ") and progress[-1].startswith("update 4 of 4  128 env")
    assert all(" env steps/s  " in line and line.endswith(" left") and len(line) < 120 for line in progress)
    assert "policy_reward" not in result.stdout
    (last,) = [line for line in result.stdout.splitlines() if line.startswith("Finished: ")]
    assert last.startswith("Finished: 4 updates, 128 env steps, ")
    assert str(run / "checkpoints" / "update_0000004.pt") in last
    assert f"Run folder: {run}" in result.stdout
    # --checkpoint-every 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["update_0000002.pt", "update_0000004.pt"]


def test_the_run_records_the_settings_given_as_given_and_the_rest_as_defaults(short_cli_run):
    # what the dashboard's configuration card reads: the short run gave --updates, the tiny
    # configuration's flags, --checkpoint-every and --dashboard
    import yaml

    configs = yaml.safe_load((short_cli_run.run / "configs.yaml").read_text())
    given = {name for name, entry in configs.items() if entry["is_explicitly_specified"]}
    assert given == {"updates", "checkpoint_every", *TINY}, given
    assert configs["n_workers"]["value"] == TINY["n_workers"] and not configs["gamma"]["is_explicitly_specified"]


def wait_for_a_checkpoint(folder: Path, process) -> Path:
    """Wait until the one run under `folder` has written a checkpoint; its run folder."""

    def written():
        assert process.poll() is None, process.communicate()[1][-2000:]
        return [checkpoint.parent.parent for checkpoint in folder.glob("logs/ppo_breakout/*/checkpoints/update_*.pt")]

    return wait_for(written, 120, "the first checkpoint")[0]


def named_checkpoint(line: str, run: Path) -> Path:
    """The checkpoint `line` says the run keeps, once checked to be the newest of `run`."""
    named = re.search(r"the last checkpoint is (\S+\.pt); ", line)
    assert named, line
    newest = max(run.glob("checkpoints/update_*.pt"), key=lambda path: int(path.stem.removeprefix("update_")))
    assert Path(named[1]).resolve() == newest.resolve(), line
    return newest


def test_a_worker_killed_during_a_run_ends_it_with_a_clear_error_naming_the_checkpoint_kept_and_no_orphans(script_dir):
    process = start_in_own_session(script_dir, "ppo_breakout.py", *LONG_RUN, "--checkpoint-every", "1")
    try:
        run = wait_for_a_checkpoint(script_dir, process)
        workers = descendants(process.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 1
    last_line = stderr.strip().splitlines()[-1]
    assert f"pid {victim}) died: killed by signal SIGKILL; the update in progress is lost; " in last_line, last_line
    named_checkpoint(last_line, run)
    assert "Traceback" not in stderr
    assert_gone(workers)


def quiet(metrics: Path, seconds: float):
    """For wait_for: true once the run's metrics have not grown for `seconds`."""
    seen = dict(lines=None, since=0.0)

    def unchanged() -> bool:
        lines = len(metrics.read_text().splitlines())
        if lines != seen["lines"]:
            seen.update(lines=lines, since=time.monotonic())
        return time.monotonic() - seen["since"] >= seconds

    return unchanged


def go_on(pid: int):
    """SIGCONT to a process a test stopped, so that nothing stays stopped (one that ended is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def test_a_hung_worker_ends_the_run_after_the_worker_timeout_naming_it_and_the_checkpoint_kept(script_dir):
    args = [*LONG_RUN, "--checkpoint-every", "1", "--worker-timeout", "3", "--dashboard", "off"]
    process = start_in_own_session(script_dir, "ppo_breakout.py", *args)
    victim = None
    try:
        run = wait_for_a_checkpoint(script_dir, process)
        workers = descendants(process.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGSTOP)  # alive, but it answers no more: as a deadlocked or swapped-out worker
        hung_at = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        took = time.monotonic() - hung_at
    finally:
        if victim is not None:
            go_on(victim)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    hung = f"(pid {victim}) has not answered in 3 s (--worker-timeout): hung; the update in progress is lost; "
    assert re.search(r"^error: worker \d ", last_line) and hung in last_line, last_line
    named_checkpoint(last_line, run)
    assert_gone(workers)
    # its 3 s, then the hung worker killed at once: well within a loaded machine's 30 s
    assert took < 30, f"the run took {took:.1f} s to end"


def test_a_first_ctrl_c_while_a_worker_hangs_ends_the_run_in_seconds_naming_the_checkpoint_kept(script_dir):
    # the default --worker-timeout, a minute; once a stop is asked for, a worker gets STOPPING_TIMEOUT_S
    process = start_in_own_session(script_dir, "ppo_breakout.py", *LONG_RUN, "--checkpoint-every", "1")
    hung = dict(run=None, victim=None, workers=set(), at=None)

    def the_trainer_waits_for_a_stopped_worker():
        hung["run"] = wait_for_a_checkpoint(script_dir, process)
        hung["workers"] = descendants(process.pid)
        assert len(hung["workers"]) == 2
        hung["victim"] = min(hung["workers"])
        os.kill(hung["victim"], signal.SIGSTOP)
        # no update ends any more: the trainer waits for the worker's steps
        wait_for(quiet(hung["run"] / "metrics.jsonl", 2), 30, "the run to wait for the stopped worker")
        hung["at"] = time.monotonic()

    try:
        _, stderr = ctrl_c(process, the_trainer_waits_for_a_stopped_worker, timeout=30)
    finally:
        if hung["victim"] is not None:
            go_on(hung["victim"])
    took, victim = time.monotonic() - hung["at"], hung["victim"]
    assert process.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "SIGINT: stopping after this update" in stderr
    last_line = stderr.strip().splitlines()[-1]
    expected = f"(pid {victim}) has not answered in 5 s after the stop signal: hung; the update in progress is lost; "
    assert expected in last_line, last_line
    named_checkpoint(last_line, hung["run"])
    assert_gone(hung["workers"])
    # STOPPING_TIMEOUT_S is 5 s: far from the 60 s of --worker-timeout, which it would wait without it
    assert took < 30, f"the run took {took:.1f} s to end after Ctrl-C"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_end_the_run_cleanly_with_the_stop_on_a_line_of_its_own(script_dir, sig, code):
    # stderr into stdout, as in a terminal or a log of both, where labml's progress line has no newline
    process = start_in_own_session(script_dir, "ppo_breakout.py", *LONG_RUN, preexec_fn=lambda: os.dup2(1, 2))
    try:
        wait_for_first_update(script_dir, process)
        workers = descendants(process.pid)
        assert len(workers) == 2
        # Ctrl-C reaches the whole process group; `kill` reaches the trainer alone
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)
        else:
            os.kill(process.pid, sig)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == code, out[-2000:]
    assert "Traceback" not in out
    (stop,) = [line for line in out.splitlines() if "Stopped at update" in line]
    assert stop.startswith("Stopped at update"), stop[-300:]
    assert_gone(workers)
    # the run ended with a checkpoint of its last update, and its metrics
    checkpointed_last_update(script_dir)


def test_a_terminal_hang_up_ends_the_run_with_a_checkpoint(script_dir):
    # before, SIGHUP killed the trainer and its workers mid-update: up to 49 updates since the
    # last checkpoint were lost
    process, workers = hang_up_after_first_update(script_dir, "ppo_breakout.py", *LONG_RUN)
    assert len(workers) == 2
    assert process.returncode == 128 + signal.SIGHUP
    assert_gone(workers)
    checkpointed_last_update(script_dir)


def test_nohup_keeps_a_run_going_through_a_hang_up(script_dir):
    # `nohup python ppo_breakout.py` starts it with SIGHUP ignored: the run must keep that
    process = start_in_own_session(
        script_dir,
        "ppo_breakout.py",
        *LONG_RUN,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    try:
        wait_for_first_update(script_dir, process)
        (metrics,) = metrics_files(script_dir)
        updates = len(metrics.read_text().splitlines())
        os.killpg(process.pid, signal.SIGHUP)
        # it goes on to train two more updates, with both its workers
        wait_for(lambda: len(metrics.read_text().splitlines()) >= updates + 2, 60, "two updates after the hang-up")
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert len(descendants(process.pid)) == 2
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def test_a_second_ctrl_c_stops_at_once_and_says_what_was_saved(script_dir):
    # updates of about a second (50 epochs of 2 minibatches), so the second Ctrl-C, sent as soon as
    # the first is acknowledged, lands inside the same update; one torch thread, as torch's threads
    # contending with other work for 2 cores made such tiny minibatches 10x slower
    args = ["--updates", "100000", *flags(dict(TINY, epochs=50))]
    process = start_in_own_session(script_dir, "ppo_breakout.py", *args, env={"OMP_NUM_THREADS": "1"})
    first = []

    def stopping_after_this_update():
        first.extend(read_until(process.stderr, lambda line: "stopping after this update" in line, "the first stop"))

    _, stderr = ctrl_c(process, lambda: wait_for_first_update(script_dir, process), stopping_after_this_update)
    stderr = "".join(first) + stderr
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    (run,) = script_dir.glob("logs/ppo_breakout/*")
    # stopped inside update 2, before the first checkpoint (one every 50): the metrics stay
    assert not list(run.glob("checkpoints/*.pt"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    last_line = stderr.strip().splitlines()[-1]
    expected = f"Stopped at once; no checkpoint yet (one every 50 updates); the metrics are in {run}"
    assert last_line == expected, last_line
