"""`python ppo_breakout.py`: bad input refused before anything starts, a run's files, and how a run
ends: a dead worker, Ctrl-C, SIGTERM, a terminal's hang-up, nohup."""

import json
import os
import re
import signal

import pytest
import torch
from conftest import (
    LONG_RUN,
    ROOT,
    TINY,
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
    (["--seed", "-1"], "--seed", "0 or more"),
    (["--seed", str(2**64)], "--seed", "less than 2**64"),
    (["--dashboard", "localhost:5005"], "--dashboard", "http(s) URL"),
    (["--dashboard", "http://localhost:port"], "--dashboard", "http(s) URL"),
    # more than any machine here holds: refused before a worker starts (was an allocator traceback;
    # 100,000 workers would have been started)
    (["--worker-steps", "10000000"], "--worker-steps", "GiB of memory"),
    (["--n-workers", "100000"], "--n-workers", "worker processes need about"),
    (["--rollout-threads", str(os.cpu_count() + 1)], "--rollout-threads", f"{os.cpu_count()} CPUs"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["--device", "cuda"], "--device", "CUDA is not available"))


@pytest.mark.parametrize("args,flag,problem", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_flag_and_starts_nothing(script_dir, monkeypatch, capsys, args, flag, problem):
    # the entry point's own main(), called here: the command line below shows it is the script's
    monkeypatch.chdir(script_dir)
    assert run_main(cli.main, *args) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in last_line and problem in last_line, last_line
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
    assert "policy_reward" in result.stdout and "steps_per_second" in result.stdout
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


def test_a_worker_killed_during_a_run_ends_it_with_a_clear_error_and_no_orphans(script_dir):
    process = start_in_own_session(script_dir, "ppo_breakout.py", *LONG_RUN)
    try:
        wait_for_first_update(script_dir, process)
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
    assert f"pid {victim}) died: killed by signal SIGKILL" in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert_gone(workers)


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
