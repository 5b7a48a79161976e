import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    checkpointed_last_update,
    child_pids,
    ctrl_c,
    hang_up_after_first_update,
    run_python,
    start_in_own_session,
    wait_for_first_update,
)

BAD_INPUTS = [
    (["--updates", "0"], "--updates", "positive"),
    (["--epochs", "-1"], "--epochs", "positive"),
    (["--n-workers", "0"], "--n-workers", "positive"),
    (["--worker-steps", "0"], "--worker-steps", "positive"),
    (["--batches", "0"], "--batches", "positive"),
    (["--batches", "3"], "--batches", "does not divide"),
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
    (["--rollout-groups", "0"], "--rollout-groups", "between 1 and n_workers"),
    (["--n-workers", "2", "--rollout-groups", "3"], "--rollout-groups", "between 1 and n_workers (2)"),
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


def run(script_dir: Path, *args, timeout=300):
    return run_python(script_dir, "ppo_breakout.py", *args, timeout=timeout)


@pytest.mark.parametrize("args,flag,problem", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_flag_and_starts_nothing(script_dir, args, flag, problem):
    result = run(script_dir, *args, timeout=60)
    assert result.returncode == 2, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert flag in last_line and problem in last_line, last_line
    assert "Traceback" not in result.stderr
    assert not (script_dir / "logs").exists(), "no run folder may be written"


def test_help_shows_every_flag_with_its_default(script_dir):
    out = run(script_dir, "--help", timeout=60).stdout.split("options:", 1)[1]
    for flag, default in [
        ("--updates", "10000"),
        ("--epochs", "8"),
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


def test_importing_the_module_starts_nothing(tmp_path):
    code = (
        "import ppo_breakout, multiprocessing, threading; " "assert not multiprocessing.active_children(); print('ok')"
    )
    result = run_python(Path(__file__).parents[1], "-c", code, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
    assert not (tmp_path / "logs").exists()


def test_a_short_run_finishes_and_writes_its_metrics(script_dir):
    result = run(script_dir, "--updates", "2", "--n-workers", "2", "--worker-steps", "32", "--epochs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics,) = script_dir.glob("logs/ppo_breakout/*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2]
    assert [r["env_steps"] for r in records] == [64, 128]
    assert "policy_reward" in result.stdout and "steps_per_second" in result.stdout


LONG_RUN = ("--updates", "1000", "--n-workers", "2", "--worker-steps", "16", "--epochs", "1")


def test_a_worker_killed_during_a_run_ends_it_with_a_clear_error_and_no_orphans(script_dir):
    process = start_in_own_session(script_dir, "ppo_breakout.py", *LONG_RUN)
    try:
        wait_for_first_update(script_dir, process)
        workers = child_pids(process.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1
    assert f"pid {victim}) died: killed by signal SIGKILL" in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers - {victim})


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_end_the_run_cleanly(script_dir, sig, code):
    process = start_in_own_session(script_dir, "ppo_breakout.py", *LONG_RUN)
    try:
        wait_for_first_update(script_dir, process)
        workers = child_pids(process.pid)
        assert len(workers) == 2
        # Ctrl-C reaches the whole process group; `kill` reaches the trainer alone
        if sig == signal.SIGINT:
            os.killpg(process.pid, sig)
        else:
            os.kill(process.pid, sig)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    # the run ended with a checkpoint of its last update, and its metrics
    checkpointed_last_update(script_dir)


def test_a_terminal_hang_up_ends_the_run_with_a_checkpoint(script_dir):
    # before, SIGHUP killed the trainer and its workers mid-update: up to 49 updates since the
    # last checkpoint were lost
    process, workers = hang_up_after_first_update(script_dir, "ppo_breakout.py", *LONG_RUN)
    assert len(workers) == 2
    assert process.returncode == 128 + signal.SIGHUP
    time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
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
        os.killpg(process.pid, signal.SIGHUP)
        time.sleep(2)
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert len(child_pids(process.pid)) == 2
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def _group_gone(pgid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0, 3.0])
def test_ctrl_c_while_starting_up_exits_130_with_one_line(script_dir, delay):
    # while torch loads, the workers start, or the first update runs: each a different moment
    process = start_in_own_session(script_dir, "ppo_breakout.py", *LONG_RUN)
    _, stderr = ctrl_c(process, delay)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("Stopped"), stderr
    assert _group_gone(process.pid), "a worker outlived the trainer"


def test_a_second_ctrl_c_stops_at_once_and_says_what_was_saved(script_dir):
    # long updates (2 x 16 samples, 100 epochs of 4 minibatches: seconds), so the second Ctrl-C
    # lands inside one; one torch thread, as torch's threads contending with other work for 2
    # cores made such tiny minibatches 10x slower
    process = start_in_own_session(script_dir, "ppo_breakout.py", *LONG_RUN[:-1], "100", env={"OMP_NUM_THREADS": "1"})
    _, stderr = ctrl_c(process, lambda: wait_for_first_update(script_dir, process), 0.5)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    (run,) = script_dir.glob("logs/ppo_breakout/*")
    # stopped inside update 2, before the first checkpoint (one every 50): the metrics stay
    assert not list(run.glob("checkpoints/*.pt"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 1
    last_line = stderr.strip().splitlines()[-1]
    expected = f"Stopped at once; no checkpoint yet (one every 50 updates); the metrics are in {run}"
    assert last_line == expected, last_line


DROPPED_CTRL_C = """
import os, runpy, signal, sys, weakref
from labml import experiment

def drop_a_ctrl_c():
    # Ctrl-C arrives while a callback runs, as it can while an import releases its module lock:
    # Python reports the KeyboardInterrupt as "Exception ignored" and goes on
    class Thing:
        pass
    def callback(_):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10000):
            pass
    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing

create = experiment.create
experiment.create = lambda *args, **kwargs: (drop_a_ctrl_c(), create(*args, **kwargs))[1]
sys.argv = ["ppo_breakout.py", *sys.argv[1:]]
runpy.run_path("ppo_breakout.py", run_name="__main__")
"""


def test_a_ctrl_c_that_python_drops_during_start_up_still_stops_the_run(script_dir):
    (script_dir / "drop_ctrl_c.py").write_text(DROPPED_CTRL_C)
    process = start_in_own_session(script_dir, "drop_ctrl_c.py", *LONG_RUN)
    _, stderr = ctrl_c(process, timeout=90)  # no wait, so no Ctrl-C but the one the wrapper drops
    assert "Exception ignored" in stderr and "KeyboardInterrupt" in stderr, stderr  # it was dropped
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "Stopped at once; no update had finished, so nothing was saved", stderr
    assert _group_gone(process.pid), "a worker outlived the trainer"


CTRL_C_WHILE_DEFINING = """
import dataclasses, os, runpy, signal, sys

dataclass = dataclasses.dataclass

def ctrl_c_then_dataclass(*args, **kwargs):
    # Ctrl-C after the imports (which use dataclasses too), while the module defines Configs
    if args and getattr(args[0], "__name__", None) == "Configs":
        os.kill(os.getpid(), signal.SIGINT)
    return dataclass(*args, **kwargs)

dataclasses.dataclass = ctrl_c_then_dataclass
sys.argv = ["ppo_breakout.py", *sys.argv[1:]]
runpy.run_path("ppo_breakout.py", run_name="__main__")
"""


def test_ctrl_c_while_the_module_defines_its_classes_exits_130_with_one_line(script_dir):
    # before, the KeyboardInterrupt came out of the Configs dataclass as a traceback (CI, once)
    (script_dir / "ctrl_c_while_defining.py").write_text(CTRL_C_WHILE_DEFINING)
    process = start_in_own_session(script_dir, "ctrl_c_while_defining.py", *LONG_RUN)
    _, stderr = ctrl_c(process, timeout=90)  # no wait: the only Ctrl-C is the wrapper's
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["Stopped by Ctrl-C while starting; nothing was saved"], stderr
    assert _group_gone(process.pid)
