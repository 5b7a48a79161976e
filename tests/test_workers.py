import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import ROOT, TINY, _alive, assert_gone, descendants

import game
from game import OBS_SHAPE, Game
from ppo_breakout import Command, Trainer, Worker, WorkerError, settings


def step(worker: Worker, action: int):
    """One step through the worker, as the Trainer takes it: (frame stack, reward, done, info)."""
    worker.send(Command.STEP, action)
    reward, done, info = worker.receive()
    return worker.obs.copy(), reward, done, info


def reset(worker: Worker) -> np.ndarray:
    worker.send(Command.RESET)
    assert worker.receive() is None
    return worker.obs.copy()


def test_step_reset_close_round_trip():
    worker = Worker(seed=5, index=0)
    game = Game(seed=5)
    rng = np.random.default_rng(5)
    dones = []
    try:
        obs = reset(worker)
        np.testing.assert_array_equal(obs, game.reset())
        for t in range(60):  # long enough to lose a life
            action = int(rng.integers(4))
            obs, reward, done, info = step(worker, action)
            expected_obs, expected_reward, expected_done, expected_info = game.step(action)
            assert obs.shape == OBS_SHAPE and obs.dtype == np.uint8
            np.testing.assert_array_equal(obs, expected_obs, err_msg=f"step {t}")
            assert type(reward) is float and type(done) is bool, t
            assert (reward, done, info) == (expected_reward, expected_done, expected_info), t
            dones.append(done)
        assert True in dones and False in dones, "both kinds of step were checked"
        np.testing.assert_array_equal(reset(worker), game.reset())  # a reset after steps, too
    finally:
        worker.close()
    assert not worker.process.is_alive() and worker.process.exitcode == 0


def test_a_whole_game_through_a_worker_matches_the_game_played_in_process():
    # steps travel through shared memory and semaphores: every frame, reward and end, and the
    # whole-game score and length when the game is over, must be what the Game itself returns
    worker = Worker(seed=7, clip_rewards=False, index=0)
    game = Game(seed=7, clip_rewards=False)
    rng = np.random.default_rng(0)
    score = 0.0
    try:
        np.testing.assert_array_equal(reset(worker), game.reset())
        for t in range(20_000):
            action = int(rng.integers(4))
            obs, reward, done, info = step(worker, action)
            expected_obs, expected_reward, expected_done, expected_info = game.step(action)
            np.testing.assert_array_equal(obs, expected_obs, err_msg=f"step {t}")
            assert (reward, done, info) == (expected_reward, expected_done, expected_info), t
            score += reward
            if info is not None:
                break
        assert info == {"reward": score, "length": t + 1}
        assert score > 0  # a random policy scores in Breakout, so the score slot was written
    finally:
        worker.close()


def test_a_worker_exits_by_itself_when_its_trainer_is_killed():
    # Linux kills workers with their trainer (PR_SET_PDEATHSIG); without that, as on macOS, a
    # worker waiting for its next command must notice that its parent is gone and exit
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import ppo_breakout

        class NoPrctl:  # no PR_SET_PDEATHSIG, as on macOS
            @staticmethod
            def CDLL(name):
                raise OSError(f"{{name}}: no such library")

        ppo_breakout.ctypes = NoPrctl
        worker = ppo_breakout.Worker(seed=0)
        worker.send(ppo_breakout.Command.RESET)
        worker.receive()
        print(worker.process.pid, flush=True)
        time.sleep(60)
        """
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker_pid = None
    try:
        worker_pid = int(trainer.stdout.readline())
        assert _alive(worker_pid)
        trainer.kill()
        trainer.wait()
        assert_gone([worker_pid], timeout=10)  # it checks every LIVENESS_CHECK_S, 0.5 s
    finally:
        trainer.kill()
        trainer.wait()
        if worker_pid is not None and _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_unknown_command_raises_a_worker_error_naming_the_worker():
    worker = Worker(seed=0, index=3)
    try:
        worker.send(9)  # no Command has the number 9
        with pytest.raises(WorkerError, match=r"worker 3 raised ValueError: 9 is not a valid Command"):
            worker.receive()
    finally:
        worker.close()


def test_a_worker_killed_with_sigkill_makes_the_trainer_raise_a_clear_error():
    trainer = Trainer(*settings(**TINY))
    try:
        victim = trainer.workers[1].process
        os.kill(victim.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=rf"worker 1 \(pid {victim.pid}\) died: killed by signal SIGKILL"):
            trainer.sample()
        assert time.monotonic() - start < 5
    finally:
        trainer.destroy()


def test_a_hung_worker_makes_receive_raise_a_clear_error_after_its_timeout():
    worker = Worker(seed=0, index=1, timeout=2.0)
    pid = worker.process.pid
    try:
        reset(worker)
        os.kill(pid, signal.SIGSTOP)  # alive, but it answers no more: as a deadlocked or swapped-out worker
        worker.send(Command.STEP, 0)
        start = time.monotonic()
        hung = rf"^worker 1 \(pid {pid}\) has not answered in 2 s \(--worker-timeout\): hung$"
        with pytest.raises(WorkerError, match=hung):
            worker.receive()
        assert 2 <= time.monotonic() - start < 5
        assert _alive(pid), "the worker hung: it did not die"
    finally:
        os.kill(pid, signal.SIGCONT)
        worker.close()
    # gone: a worker that hung is not waited for (killed at once, unless the SIGCONT above let it
    # take its CLOSE first)
    assert worker.process.exitcode in (0, -signal.SIGKILL)


def test_destroy_joins_every_worker():
    trainer = Trainer(*settings(**{**TINY, "n_workers": 3}))
    pids = {w.process.pid for w in trainer.workers}
    assert len(pids) == 3 and pids <= descendants()
    trainer.destroy()
    assert not pids & descendants()


def test_an_exception_in_the_loop_leaves_no_child_process():
    # the no_process_left check after every test sees a worker left behind
    with pytest.raises(RuntimeError, match="boom"):
        with Trainer(*settings(**TINY)) as trainer:

            def explode(samples):
                raise RuntimeError("boom")

            trainer.train = explode
            trainer.run_training_loop()


def test_an_exception_inside_a_worker_is_reported_with_its_cause(monkeypatch):
    def broken_reset(self):
        raise RuntimeError("the emulator is on fire")

    monkeypatch.setattr(Game, "reset", broken_reset)  # the forked worker inherits it
    worker = Worker(seed=0, index=2)
    try:
        worker.send(Command.RESET)
        with pytest.raises(WorkerError, match="worker 2 raised RuntimeError: the emulator is on fire"):
            worker.receive()
    finally:
        worker.close()


def test_a_worker_whose_emulator_exits_is_reported(monkeypatch):
    # ALE calls exit(1) itself on a missing ROM file: no Python exception ever reaches us
    monkeypatch.setattr(game, "rom_path", lambda name: "/nonexistent/rom.bin")
    worker = Worker(seed=0, index=4)
    try:
        worker.send(Command.RESET)
        with pytest.raises(WorkerError, match=r"worker 4 \(pid \d+\) died: exit code 1"):
            worker.receive()
    finally:
        worker.close()
