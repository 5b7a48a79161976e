"""
# PPO on Atari Breakout

Proximal Policy Optimization ([Schulman et al. 2017](https://arxiv.org/abs/1707.06347)) with
Generalized Advantage Estimation ([Schulman et al. 2015](https://arxiv.org/abs/1506.02438)) on an
Atari game of the Arcade Learning Environment, with the DQN preprocessing of
[Mnih et al. 2015](https://www.nature.com/articles/nature14236). The score reported is the mean of
the last 100 whole training games, as the PPO paper and CleanRL report theirs.

It follows labml.ai's annotated PPO experiment (labml-nn 0.5.1: `labml_nn/rl/ppo/experiment.py`,
`rl/game.py`, `rl/ppo/gae.py`, `rl/ppo/__init__.py`), keeping its shape and names, on today's
packages: ale-py with its own ROMs, and labml 0.4.168's dynamic hyperparameters.

    python ppo_breakout.py                            # the default experiment: 10,000 updates
    python ppo_breakout.py --updates 3 --n-workers 2  # a quick smoke run; --help lists every setting
    python ppo_breakout.py --resume logs/ppo_breakout/<run>   # go on from its newest checkpoint
    python ppo_breakout.py evaluate logs/ppo_breakout/<run> --video game.mp4   # evaluate.py
    python ppo_breakout.py plot logs/ppo_breakout/<run> -o curve.png           # plots.py
    python ppo_breakout.py dashboard                  # the labml dashboard, offline (dashboard.py)
    torchrun --standalone --nproc_per_node=2 ppo_breakout.py  # one policy, 2 processes (distributed.py)

It reads in the order the data flows: configuration, Game, workers, Model, GAE, losses, Trainer.
How fast it runs is speed.py's business, below it; the command line and the run's files are the
tools' beside it.
"""

import contextlib
import copy
import ctypes
import dataclasses
import enum
import importlib
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from labml import experiment, logger, monit, tracker
from labml.configs import FloatDynamicHyperParam, IntDynamicHyperParam
from labml.internal.configs.dynamic_hyperparam import DynamicHyperParam
from torch import nn, optim
from torch.distributions import Categorical

import speed

# ## Configuration
#
# Each setting is declared once, with its default and its help, from which its flag is made. Two
# kinds: `Configs`, what the learning depends on, kept in every checkpoint and taken from it on
# resume; and `RunSettings`, what the machine does, taken from the command line every time.


def setting(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Configs:
    """The algorithm's settings."""

    updates: int = setting(10_000, "number of updates (sample, then train)")
    # 4, not labml's 8: at 1M steps 4 scored higher on each of 3 seeds, kept the approximate KL
    # near 0.09 where 8 climbed to 0.5-0.7, and trains 1.5x faster (README, "Differences")
    epochs: int = setting(4, "passes over each batch of samples (dynamic)")
    # 8 workers x 128 steps, as in the PPO paper's Atari runs
    n_workers: int = setting(8, "game worker processes")
    worker_steps: int = setting(128, "steps each worker takes per update")
    batches: int = setting(4, "minibatches per epoch; must divide n_workers * worker_steps")
    value_loss_coef: float = setting(0.5, "weight of the value-function loss (dynamic)")
    entropy_bonus_coef: float = setting(0.01, "weight of the entropy bonus (dynamic)")
    clip_range: float = setting(0.1, "PPO clip range epsilon, in (0, 1) (dynamic)")
    learning_rate: float = setting(1e-3, "Adam learning rate (dynamic; the value --lr-schedule linear scales)")
    # linear is the PPO paper's Atari setting and CleanRL's; constant is labml's, and a constant 1e-3
    # for 10M steps risks the collapse the rising KL hints at
    lr_schedule: str = setting("linear", "constant, or linear: anneal the learning rate to 0 at the last update")
    # CleanRL and openai/baselines use 1e-5 for PPO on Atari; 1e-8 is PyTorch's and labml's
    adam_eps: float = setting(1e-8, "Adam's epsilon")
    orthogonal_init: bool = setting(False, "orthogonal initialisation of the model (baselines / CleanRL)")
    gamma: float = setting(0.99, "discount factor, in [0, 1]")
    # a little bias for much lower variance (GAE paper, section 6)
    lambda_: float = setting(0.95, "GAE lambda, in [0, 1]")
    seed: int = setting(1, "random seed")
    game: str = setting("breakout", "an Atari ROM that ale-py ships")
    # as DQN and PPO did; the reported scores are always the game's own
    clip_rewards: bool = setting(True, "train on the sign of the game reward")
    max_grad_norm: float = setting(0.5, "global gradient-norm clip")


@dataclasses.dataclass
class RunSettings:
    """The machine's settings: where and how fast the same algorithm runs, and what it keeps."""

    device: str = setting("auto", "auto, cpu, cuda or cuda:N (auto: the CUDA GPU when there is one)")
    # auto: bf16 where the hardware computes it natively, fp32 elsewhere (speed.autocast_dtype)
    precision: str = setting("auto", "auto, fp32 or bf16 (autocast; the heads and losses stay fp32)")
    # the speed paths: each is measured in docs/speed.md
    channels_last: bool = setting(True, "NHWC memory format for the convolutions")
    reuse_freed_memory: bool = setting(True, "keep freed memory for the next minibatch instead of returning it (glibc)")
    rollout_threads: int = setting(1, "torch threads while sampling, on any device (0: torch's default)")
    cuda_graphs: bool = setting(True, "on a CUDA GPU, replay each minibatch step and rollout forward as a CUDA graph")
    checkpoint_every: int = setting(50, "updates between checkpoints (and one at the end and at Ctrl-C/SIGTERM/SIGHUP)")
    keep_checkpoints: int = setting(3, "how many of the newest checkpoints to keep")
    # under torchrun (distributed.py): how the ranks talk, and which GPU each local rank uses
    backend: str = setting("auto", "torchrun: auto (nccl where each rank has a GPU of its own, else gloo), gloo, nccl")
    device_ids: str = setting("", "torchrun: the GPU of each local rank, such as 0,0 for 2 ranks on GPU 0")


def settings_from(kind, values: dict):
    """`kind` (Configs or RunSettings) from those of `values` that are its fields (parsed flags, a
    checkpoint's configuration), its defaults for the rest."""
    return kind(**{k: v for k, v in values.items() if k in kind.__dataclass_fields__})


# ⚙️ The settings that may change while a run goes on, from the labml dashboard, with the ranges it
# offers (labml's experiment's). A value given outside its range widens it.
DYNAMIC = {
    "epochs": (1, 32),
    "value_loss_coef": (0.0, 1.0),
    "entropy_bonus_coef": (0.0, 0.1),
    "clip_range": (0.01, 0.5),
    "learning_rate": (0.0, 1e-3),
}


def batches_problem(c: Configs) -> Optional[str]:
    """What is wrong with `batches`, if anything: it must divide the batch into equal minibatches."""
    batch_size = c.n_workers * c.worker_steps
    if c.batches > 0 and batch_size > 0 and batch_size % c.batches == 0:
        return None
    return f"{c.batches} does not divide the batch n_workers * worker_steps = {batch_size}"


# ## Game
#
# One Atari game, seen the way published Breakout results see it ("NoFrameskip-v4" with the DQN
# preprocessing): no sticky actions, each action repeated 4 frames with the max of the last two
# (Atari sprites flicker), grey 84x84, the last 4 frames stacked, up to 30 no-ops at the start of a
# game, and FIRE to launch the ball where the game needs it. Games are capped at 108,000 frames,
# today's ale-py's cap (old gym's NoFrameskip-v4 allowed 400,000: a game of more than 30 minutes).
#
# labml's `game.py` reset the whole game at every lost life, so its reported "reward" was a
# one-life score. Here a lost life only ends the *training* episode (`done`, which cuts GAE); the
# game goes on from a fresh frame stack, and the score reported in `info` is the whole game over
# all lives.

FRAME_SKIP = 4  # frames per agent step (Mnih et al. 2015)
NOOP_MAX = 30  # at most this many no-op frames at the start of a game, for varied starts
MAX_FRAMES = 108_000  # 30 minutes of play at 60 frames/s, the cap of today's ale-py environments
FRAME_SIZE = 84
FRAME_STACK = 4  # the model sees the last 4 frames, to perceive motion
OBS_SHAPE = (FRAME_STACK, FRAME_SIZE, FRAME_SIZE)


def rom_path(game: str) -> Optional[str]:
    """Path of the ROM that ale-py ships for `game`, or None."""
    from ale_py import roms

    return str(roms.get_rom_path(game)) if game in roms.get_all_rom_ids() else None


def minimal_actions(game: str) -> List[int]:
    """The game's minimal action set (4 for Breakout: NOOP, FIRE, RIGHT, LEFT)."""
    return list(Game(0, game).actions)


class Game:
    """One Atari game inside a worker. `reset() -> obs` starts a game; `step(action) -> (obs,
    reward, done, info)` where `obs` is a uint8 array [4, 84, 84], `reward` the training reward (its
    sign when `clip_rewards`), `done` True when a life is lost or the game is over, and `info` None
    except on the step that ends a game: `{"reward": whole-game score, unclipped, "length": agent
    steps}`. The game resets itself when it is over; the returned `obs` is then the new game's first."""

    def __init__(self, seed: int, game: str = "breakout", clip_rewards: bool = True, sticky_actions: float = 0.0):
        import ale_py

        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner per worker
        self.ale = ale_py.ALEInterface()
        self.ale.setInt("random_seed", int(seed) % 2**31)
        # 0 in training, as NoFrameskip-v4; evaluate --sticky-actions 0.25 is Machado et al. 2018's
        self.ale.setFloat("repeat_action_probability", sticky_actions)
        self.ale.setInt("max_num_frames_per_episode", MAX_FRAMES)
        self.ale.loadROM(rom_path(game))
        self.actions = self.ale.getMinimalActionSet()
        self.fire = ale_py.Action.FIRE if ale_py.Action.FIRE in self.actions else None
        self.clip_rewards = clip_rewards
        self.rng = np.random.default_rng(seed)
        height, width = self.ale.getScreenDims()
        self.screens = np.zeros((2, height, width), dtype=np.uint8)  # a step's last two grey frames
        self.obs_4 = np.zeros(OBS_SHAPE, dtype=np.uint8)
        self.score, self.length, self.lives = 0.0, 0, 0
        # when set, called with every emulator frame in colour (the evaluation video's writer)
        self.on_frame: Optional[Callable[[np.ndarray], None]] = None

    def _act(self, action) -> float:
        reward = self.ale.act(action)
        if self.on_frame is not None:
            self.on_frame(self.ale.getScreenRGB())
        return reward

    def _repeat(self, action) -> float:
        """Play `action` for FRAME_SKIP frames, keep the last two screens, return the reward."""
        reward = 0.0
        for i in range(FRAME_SKIP):
            reward += self._act(action)
            if i >= FRAME_SKIP - 2:
                self.ale.getScreenGrayscale(self.screens[i - (FRAME_SKIP - 2)])
            if self.ale.game_over():
                break
        return reward

    def _push_frame(self):
        """Max of the last two screens, down to 84x84, onto the frame stack."""
        import cv2

        frame = np.maximum(self.screens[0], self.screens[1])
        self.obs_4[:-1] = self.obs_4[1:]
        self.obs_4[-1] = cv2.resize(frame, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)

    def step(self, action: int):
        reward = self._repeat(self.actions[action])
        lives = self.ale.lives()
        life_lost, self.lives = lives < self.lives, lives
        if life_lost and self.fire is not None and not self.ale.game_over():
            # relaunch the ball, or the agent may wait forever for an action it never learnt
            reward += self._repeat(self.fire)
        self.score += reward
        self.length += 1
        game_over, info = self.ale.game_over(), None
        if game_over:
            info = {"reward": self.score, "length": self.length}
            self.reset()
        elif life_lost:
            # a new life starts a fresh stack of its first frame, as the published preprocessing's
            # autoreset after EpisodicLifeEnv refills FrameStack (CleanRL, SB3): nothing of the
            # previous life is seen after its `done`
            self._push_frame()
            self.obs_4[:-1] = self.obs_4[-1]
        else:
            self._push_frame()
        if self.clip_rewards:
            reward = float(np.sign(reward))
        return self.obs_4, reward, game_over or life_lost, info

    def reset(self):
        self.ale.reset_game()
        for _ in range(self.rng.integers(1, NOOP_MAX + 1)):
            self._act(self.actions[0])  # the minimal action set starts with NOOP
        if self.fire is not None:
            self._repeat(self.fire)  # its last two screens make the first frame, as every step's do
        else:
            self.ale.getScreenGrayscale(self.screens[0])
            self.screens[1] = self.screens[0]
        self._push_frame()
        self.obs_4[:] = self.obs_4[-1]
        self.score, self.length, self.lives = 0.0, 0, self.ale.lives()
        return self.obs_4

    def get_state(self) -> dict:
        """The game as it stands, in numpy arrays and plain numbers (no pickled objects): the
        emulator with its random generator (ale-py's cloneState, ~15 KB for Breakout), the no-op
        generator, the frame stack and last two screens, the score, length and lives so far."""
        emulator = self.ale.cloneState(include_rng=True)
        return {
            "emulator": np.frombuffer(emulator.serialize(), dtype=np.uint8).copy(),
            "noop_rng": self.rng.bit_generator.state,
            "obs_4": self.obs_4.copy(),
            "screens": self.screens.copy(),
            "score": self.score,
            "length": self.length,
            "lives": self.lives,
        }

    def set_state(self, state: dict):
        """Go on from `get_state()`'s game: the same frames, rewards and ends follow."""
        import ale_py

        self.ale.restoreState(ale_py.ALEState(np.asarray(state["emulator"], dtype=np.uint8).tobytes()))
        self.rng.bit_generator.state = state["noop_rng"]
        self.obs_4[:], self.screens[:] = state["obs_4"], state["screens"]
        self.score, self.length, self.lives = float(state["score"]), int(state["length"]), int(state["lives"])


# ## Worker processes
#
# Each Game runs in its own process. A step, the command sent thousands of times a second, goes
# through shared memory: the trainer writes the action into the worker's slots and releases its
# `go` semaphore; the worker steps, writes the frame stack, reward, `done` and the game's score
# in place, and releases `ready`. Nothing is pickled. The rare commands, ("reset", None) and
# ("close", None), and a worker's error report, ("error", message), travel over a Pipe.


class Command(enum.IntEnum):
    """What a worker does when its `go` semaphore is released."""

    STEP = 0  # step the game with `Slots.action`
    PIPE = 1  # read the command from the pipe


class Slots(ctypes.Structure):
    """The shared memory of one worker, besides its frame stack."""

    _fields_ = [
        ("command", ctypes.c_int),  # a Command
        ("action", ctypes.c_int),  # the index of the action in the game's minimal action set
        ("failed", ctypes.c_bool),  # the worker raised and sent its error over the pipe
        ("reward", ctypes.c_double),  # the step's training reward
        ("done", ctypes.c_bool),  # a life was lost or the game is over
        ("game_over", ctypes.c_bool),  # the game is over: score and length are its whole game's
        ("score", ctypes.c_double),
        ("length", ctypes.c_int64),
    ]


LIVENESS_CHECK_S = 0.5  # how often a waiting trainer checks its worker lives, and a worker its trainer


class WorkerError(RuntimeError):
    """A worker process died or raised."""


def die_with_parent(signum: int):
    """Have Linux send `signum` to this process when its parent dies (prctl PR_SET_PDEATHSIG);
    elsewhere nothing."""
    pr_set_pdeathsig = 1  # from linux/prctl.h
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signum)


def worker_process(remote, go, ready, slots: Slots, obs_buffer, parent_pid: int, seed: int, game: str, clip_rewards):
    # Ctrl-C, a hang-up and torchrun's SIGTERM go to the whole process group: the trainer handles them
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(0)
    obs = np.frombuffer(obs_buffer, dtype=np.uint8).reshape(OBS_SHAPE)
    try:
        env = Game(seed, game, clip_rewards)
        while True:
            while not go.acquire(timeout=LIVENESS_CHECK_S):
                if os.getppid() != parent_pid:
                    return  # the trainer is gone (where there is no prctl)
            if slots.command == Command.STEP:
                obs[:], slots.reward, slots.done, info = env.step(slots.action)
                if info is not None:
                    slots.score, slots.length = info["reward"], info["length"]
                slots.game_over = info is not None
            else:
                cmd, data = remote.recv()
                if cmd == "reset":
                    obs[:] = env.reset()
                elif cmd == "get_state":
                    remote.send(("state", env.get_state()))
                elif cmd == "set_state":
                    env.set_state(data)
                    obs[:] = env.obs_4
                elif cmd == "close":
                    return
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            ready.release()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the trainer is gone
    except BaseException as e:
        with contextlib.suppress(OSError):
            remote.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            slots.failed = True
            ready.release()
        raise SystemExit(1)
    finally:
        remote.close()


class Worker:
    """A Game in a process of its own. `send(cmd, data)` and `receive()` are split so a trainer can
    step all workers at once: `send("step", action)`, then `receive() -> (reward, done, info)` with
    the new frame stack in `obs`; `send("reset")`, then `receive() -> None`; `send("get_state")`,
    then `receive() -> Game.get_state()`; `send("set_state", state)`, then `receive() -> None` with
    the game's frame stack in `obs`. `receive()` raises `WorkerError` naming the worker when it
    raised, and within LIVENESS_CHECK_S when it died."""

    def __init__(self, seed: int, game: str = "breakout", clip_rewards: bool = True, index: int = 0):
        # fork starts the workers in milliseconds, and is safe: they never touch torch
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.index = index
        obs_buffer = ctx.RawArray("B", int(np.prod(OBS_SHAPE)))
        self.obs = np.frombuffer(obs_buffer, dtype=np.uint8).reshape(OBS_SHAPE)
        self.slots = ctx.RawValue(Slots)
        self.go, self.ready = ctx.Semaphore(0), ctx.Semaphore(0)
        self.child, parent = ctx.Pipe()
        args = (parent, self.go, self.ready, self.slots, obs_buffer, os.getpid(), seed, game, clip_rewards)
        self.process = ctx.Process(target=worker_process, name=f"ppo-worker-{index}", daemon=True, args=args)
        self.process.start()
        parent.close()
        self.closing = False
        self.sent: Optional[str] = None  # the last command sent

    def send(self, cmd: str, data=None):
        self.sent = cmd
        if cmd == "step":
            self.slots.action = data
            self.slots.command = Command.STEP
        else:
            try:
                self.child.send((cmd, data))
            except OSError:
                self._raise_dead()
            self.slots.command = Command.PIPE
        self.go.release()

    def receive(self):
        while not self.ready.acquire(timeout=LIVENESS_CHECK_S):
            if not self.process.is_alive():
                self._raise_dead()
        if self.slots.failed:
            self._raise_dead()
        if self.slots.command != Command.STEP:
            return self.child.recv()[1] if self.sent == "get_state" else None
        info = None
        if self.slots.game_over:
            info = {"reward": self.slots.score, "length": self.slots.length}
        return self.slots.reward, self.slots.done, info

    def _raise_dead(self):
        # a worker that raised sent its error before it exited: that is the cause to report
        with contextlib.suppress(EOFError, OSError):
            while self.child.poll():
                reply = self.child.recv()
                if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "error":
                    raise WorkerError(f"worker {self.index} raised {reply[1]}")
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        cause = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        raise WorkerError(f"worker {self.index} (pid {self.process.pid}) died: {cause}")

    def request_close(self):
        """Ask the worker to stop, without waiting: the trainer asks all of them, then joins each."""
        if not self.closing and self.process.is_alive():
            self.closing = True
            with contextlib.suppress(OSError):
                self.child.send(("close", None))
                self.slots.command = Command.PIPE
                self.go.release()

    def close(self, timeout: float = 5.0):
        """Ask the worker to stop and join it; terminate, then kill it, if it does not stop in time."""
        self.request_close()
        self.process.join(timeout)
        for stop in (self.process.terminate, self.process.kill):
            if self.process.is_alive():
                stop()
                self.process.join(timeout)
        self.child.close()


# ## Model
#
# The Nature DQN convolutional network (Mnih et al. 2015), shared by the policy and value heads.


class Model(nn.Module):
    def __init__(self, n_actions: int = 4, orthogonal_init: bool = False):
        super().__init__()
        # 84x84 -> 20x20
        self.conv1 = nn.Conv2d(in_channels=FRAME_STACK, out_channels=32, kernel_size=8, stride=4)
        # 20x20 -> 9x9
        self.conv2 = nn.Conv2d(in_channels=32, out_channels=64, kernel_size=4, stride=2)
        # 9x9 -> 7x7
        self.conv3 = nn.Conv2d(in_channels=64, out_channels=64, kernel_size=3, stride=1)
        self.lin = nn.Linear(in_features=7 * 7 * 64, out_features=512)
        # logits of pi, one per action of the game's minimal action set
        self.pi_logits = nn.Linear(in_features=512, out_features=n_actions)
        self.value = nn.Linear(in_features=512, out_features=1)
        self.activation = nn.ReLU()
        if orthogonal_init:
            # as openai/baselines: sqrt(2) keeps ReLU activations' scale; a small policy head
            # starts near-uniform over actions
            gains = [(self.conv1, 2**0.5), (self.conv2, 2**0.5), (self.conv3, 2**0.5), (self.lin, 2**0.5)]
            for layer, gain in gains + [(self.pi_logits, 0.01), (self.value, 1.0)]:
                nn.init.orthogonal_(layer.weight, gain)
                nn.init.zeros_(layer.bias)

    def forward(self, obs: torch.Tensor) -> Tuple[Categorical, torch.Tensor]:
        # obs: uint8 [batch, 4, 84, 84], reordered to NHWC while still 1 byte a pixel when the
        # model is channels-last, then made float and scaled to [0, 1] in place (the same numbers
        # as `obs / 255.0`, without its mixed-type division)
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            obs = obs.contiguous(memory_format=torch.channels_last)
        h = obs.float().div_(255.0)
        h = self.activation(self.conv1(h))
        h = self.activation(self.conv2(h))
        h = self.activation(self.conv3(h))
        h = h.reshape((-1, 7 * 7 * 64))
        h = self.activation(self.lin(h))
        # the heads compute in fp32 even under bf16 autocast: bf16's 8-bit mantissa would round the
        # log-probabilities of the ratio pi / pi_OLD and the values the returns are built on
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            pi = Categorical(logits=self.pi_logits(h), validate_args=False)
            value = self.value(h).reshape(-1)
        return pi, value


# ## Generalized Advantage Estimation


class GAE:
    """
    $\\hat{A}_t = \\delta_t + \\gamma \\lambda \\hat{A}_{t+1}$ with
    $\\delta_t = r_t + \\gamma V(s_{t+1}) - V(s_t)$.

    The done convention: `done[:, t]` is True when the episode ended with step t, so
    $s_{t+1}$ belongs to a new episode: its value and everything after it are masked out of
    $\\hat{A}_t$ (a lost life counts as an ended episode).
    `values` has `worker_steps + 1` columns: the last is $V$ of the state after the final step,
    which bootstraps the return of an episode still running when the rollout stops.
    """

    def __init__(self, n_workers: int, worker_steps: int, gamma: float, lambda_: float):
        self.n_workers, self.worker_steps, self.gamma, self.lambda_ = n_workers, worker_steps, gamma, lambda_

    def __call__(self, done: np.ndarray, rewards: np.ndarray, values: np.ndarray) -> np.ndarray:
        advantages = np.zeros((self.n_workers, self.worker_steps), dtype=np.float32)
        last_advantage = 0
        last_value = values[:, -1]
        for t in reversed(range(self.worker_steps)):
            mask = 1.0 - done[:, t]
            last_value = last_value * mask
            last_advantage = last_advantage * mask
            delta = rewards[:, t] + self.gamma * last_value - values[:, t]
            last_advantage = delta + self.gamma * self.lambda_ * last_advantage
            advantages[:, t] = last_advantage
            last_value = values[:, t]
        return advantages


# ## Losses


class ClippedPPOLoss(nn.Module):
    """
    $\\mathcal{L}^{CLIP}(\\theta) = \\mathbb{E}\\bigl[\\min\\bigl(r_t(\\theta) \\bar{A}_t,
    \\operatorname{clip}(r_t(\\theta), 1 - \\epsilon, 1 + \\epsilon) \\bar{A}_t\\bigr)\\bigr]$,
    returned negated (a loss to minimise). `r_t(\\theta) = \\pi_\\theta(a_t|s_t) /
    \\pi_{\\theta_{OLD}}(a_t|s_t)` is the probability `ratio`, not the reward. Taking the min means
    the gradient only pulls the policy back once it has moved more than `clip` away.
    `clip_fraction` is the share of samples whose ratio lies outside `[1 - clip, 1 + clip]`.
    """

    def forward(self, log_pi: torch.Tensor, sampled_log_pi: torch.Tensor, advantage: torch.Tensor, clip: float):
        ratio = torch.exp(log_pi - sampled_log_pi)
        clipped_ratio = ratio.clamp(min=1.0 - clip, max=1.0 + clip)
        policy_reward = torch.min(ratio * advantage, clipped_ratio * advantage)
        self.clip_fraction = ((ratio - 1.0).abs() > clip).to(torch.float).mean()
        return -policy_reward.mean()


class ClippedValueFunctionLoss(nn.Module):
    """
    $\\mathcal{L}^{VF}(\\theta) = \\frac{1}{2} \\mathbb{E}\\bigl[\\max\\bigl((V_\\theta(s_t) - R_t)^2,
    (V^{CLIP}_\\theta(s_t) - R_t)^2\\bigr)\\bigr]$ where $V^{CLIP}$ stays within `clip` of the
    value at sampling time, so the value function cannot jump far from it in one update.
    """

    def forward(self, value: torch.Tensor, sampled_value: torch.Tensor, sampled_return: torch.Tensor, clip: float):
        clipped_value = sampled_value + (value - sampled_value).clamp(min=-clip, max=clip)
        vf_loss = torch.max((value - sampled_return) ** 2, (clipped_value - sampled_return) ** 2)
        return 0.5 * vf_loss.mean()


# ## Trainer
#
# First what the Trainer leans on: the dashboard's values kept in range, the device a setting
# names, and the partner it exchanges with (nobody, when it trains alone); then the Trainer,
# whose methods follow the data: sample -> train -> loss -> loop.


class CheckedValue:
    """A dynamic hyperparameter that keeps the dashboard's value inside its range: a value out of
    range is clamped, one that is not a finite number refused, so neither can derail the run."""

    def set_value(self, value):
        low, high = self._range_
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number):
            logger.log(f"{self._key}: refused {value!r} from the dashboard, keeping {self._value}")
            return
        clamped = min(max(number, low), high)
        if clamped != number:
            logger.log(f"{self._key}: {number} is outside {low}..{high}, using {clamped}")
        super().set_value(clamped)


class CheckedInt(CheckedValue, IntDynamicHyperParam):
    pass


class CheckedFloat(CheckedValue, FloatDynamicHyperParam):
    pass


def dynamic_hyperparam(name: str, value) -> DynamicHyperParam:
    """A labml dynamic hyperparameter for `name`, starting at `value` (or `value` itself)."""
    if isinstance(value, DynamicHyperParam):
        return value
    low, high = DYNAMIC[name]
    kind = CheckedInt if Configs.__dataclass_fields__[name].type is int else CheckedFloat
    return kind(value, (min(low, value), max(high, value)))


def parse_device(name: str) -> torch.device:
    """The device `--device` names (auto: the first CUDA GPU when there is one, else the CPU);
    raises ValueError saying what is wrong with `name`."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"not a device: {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} was asked for but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device


class OneProcess:
    """The Trainer's partner when it trains alone. Under torchrun the partner is
    `distributed.Ranks`, whose exchanges with the job's other processes are here the identity."""

    rank, world_size = 0, 1
    torchrun = False
    job = None  # a torchrun job's name

    def all_games(self, games: List[dict]) -> List[dict]:
        return games

    def average(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def average_gradients(self, parameters):
        pass

    def mean_std(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x.mean(), x.std()

    def largest(self, value: int) -> int:
        return value

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order."""
        return [value]

    def hold_dynamic(self, trainer: "Trainer"):
        pass


def cuda_rng_state(device: torch.device) -> torch.Tensor:
    """The random state of `device`'s own CUDA generator, or an empty tensor on the CPU: only the
    trainer's own, so a checkpoint written where 8 GPUs are visible resumes where there is one."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)


def set_cuda_rng_state(state, device: torch.device):
    """Restore `cuda_rng_state()` on `device`; nothing on the CPU or from a CPU checkpoint."""
    if isinstance(state, list):  # checkpoints before: every visible GPU's; the trainer's was the first
        state = state[0] if state else torch.zeros(0, dtype=torch.uint8)
    if device.type == "cuda" and state.numel():
        torch.cuda.set_rng_state(state, device)


# the statistics of each minibatch, in the order `_calc_loss` returns them
STATS = ("policy_reward", "value_loss", "entropy_bonus", "kl_div", "clip_fraction")
# the dynamic values each minibatch step reads besides the learning rate, passed to it by name
MINIBATCH_DYNAMIC = ("clip_range", "value_loss_coef", "entropy_bonus_coef")


class Trainer:
    """Samples from the workers with the current policy, computes advantages, and trains the model
    for `epochs` passes of `batches` minibatches over each batch. `Trainer(configs, run_settings,
    **overrides)`: any `Configs` or `RunSettings` field may be overridden by keyword, the dynamic
    ones by labml dynamic hyperparameters (as labml's experiment did); `checkpoint`, a
    `state_dict()`, continues that run, with its own settings (the dashboard's last values among
    them) unless `configs` are given; `partner` is torchrun's `distributed.Ranks`, or nobody."""

    def __init__(
        self,
        configs: Optional[Configs] = None,
        run_settings: Optional[RunSettings] = None,
        checkpoint: Optional[dict] = None,
        partner=None,
        **overrides,
    ):
        plain = {k: (v._value if isinstance(v, DynamicHyperParam) else v) for k, v in overrides.items()}
        unknown = set(plain) - set(Configs.__dataclass_fields__) - set(RunSettings.__dataclass_fields__)
        if unknown:
            raise TypeError(f"Trainer() got unknown settings {sorted(unknown)}")
        algorithm = {k: v for k, v in plain.items() if k in Configs.__dataclass_fields__}
        machine = {k: v for k, v in plain.items() if k in RunSettings.__dataclass_fields__}
        if configs is None and checkpoint is not None:  # without settings, the checkpoint's go on
            configs = settings_from(Configs, checkpoint["configs"])
        c = self.configs = dataclasses.replace(configs or Configs(), **algorithm)
        r = self.run_settings = dataclasses.replace(run_settings or RunSettings(), **machine)
        problem = batches_problem(c)  # cli.config_errors checks the rest before a run starts
        if problem:
            raise ValueError(f"batches: {problem}")
        self.partner = partner or OneProcess()
        self.updates, self.n_workers, self.worker_steps = c.updates, c.n_workers, c.worker_steps
        # total number of samples for a single update, and the size of a minibatch
        self.batch_size = self.n_workers * self.worker_steps
        self.mini_batch_size = self.batch_size // c.batches
        # ⚙️ self.epochs, self.value_loss_coef, self.entropy_bonus_coef, self.clip_range and
        # self.learning_rate: read by calling them where they are used
        for name in DYNAMIC:
            setattr(self, name, dynamic_hyperparam(name, overrides.get(name, getattr(c, name))))

        self.device = parse_device(r.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # two input shapes: time cuDNN's kernels once for each
        self.autocast_dtype = speed.autocast_dtype(r.precision, self.device)
        self.reusing_freed_memory = r.reuse_freed_memory and speed.reuse_freed_memory()
        self.graphs = r.cuda_graphs and self.device.type == "cuda"
        torch.manual_seed(c.seed)
        self.model = Model(len(minimal_actions(c.game)), c.orthogonal_init).to(self.device)
        if r.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # fused: one kernel for the whole step; the same algorithm and saved moments
        self.optimizer = optim.Adam(self.model.parameters(), lr=c.learning_rate, eps=c.adam_eps, fused=True)
        self.gae = GAE(self.n_workers, self.worker_steps, c.gamma, c.lambda_)
        self.ppo_loss = ClippedPPOLoss()
        self.value_loss = ClippedValueFunctionLoss()
        # a minibatch's gradient step and the rollout's forward pass, eager or as CUDA graphs
        if self.graphs:
            self.train_step = speed.GraphedTrainStep(self._train_step, self.optimizer, self.mini_batch_size)
        else:
            self.train_step = speed.TrainStep(self._train_step, self.optimizer)
        self.act = speed.Forward(self._act, self.device, self.graphs)

        # updates done so far, agent steps taken by all workers together, and Adam's steps
        self.update, self.env_steps, self.optimizer_steps = 0, 0, 0
        # whole-game scores and lengths of the last 100 games, reported as their mean
        self.episode_rewards, self.episode_lengths = deque(maxlen=100), deque(maxlen=100)
        self.games: List[dict] = []  # the games that ended in the latest rollout
        self.explained_variance = float("nan")

        # the rollout buffers, allocated once; frames pinned on a CUDA machine for a fast copy
        n, t = self.n_workers, self.worker_steps
        self.obs = np.zeros((n, *OBS_SHAPE), dtype=np.uint8)  # the latest observation of each worker
        self.rollout_obs = torch.zeros((n, t, *OBS_SHAPE), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        self.rewards = np.zeros((n, t), dtype=np.float32)
        self.done = np.zeros((n, t), dtype=bool)
        self.actions = torch.zeros((n, t), dtype=torch.long)
        self.log_pis = torch.zeros((n, t), dtype=torch.float32, device=self.device)
        self.values = torch.zeros((n, t + 1), dtype=torch.float32, device=self.device)

        self.stop_requested = False  # a signal number: stop after the current update
        self.checkpointing = False  # this update ends with a checkpoint (the loop decides)
        # (update, every rank's `rank_state()`) taken at the latest checkpoint update, for state_dict
        self.ranks_state: Optional[Tuple[int, List[dict]]] = None
        if checkpoint is not None:
            self.load_state_dict(checkpoint)

        # worker seeds come from one SeedSequence, so runs with nearby seeds share no game; a
        # resumed run goes on with the checkpoint's games, or, where it has none that fit, starts
        # new games seeded by its update. Under torchrun the job's seeds are split among the ranks.
        entropy = c.seed if self.update == 0 else [c.seed, self.update]
        rank, world = self.partner.rank, self.partner.world_size
        seeds = np.random.SeedSequence(entropy).generate_state(self.n_workers * world)[rank * self.n_workers :]
        self.workers: List[Worker] = []
        try:
            for i in range(self.n_workers):
                self.workers.append(Worker(int(seeds[i]), c.game, c.clip_rewards, index=i))
            for worker in self.workers:
                worker.send("reset")
            for i, worker in enumerate(self.workers):
                worker.receive()
                self.obs[i] = worker.obs
            self.resumed_games = checkpoint is not None and self._resume_games(checkpoint)
        except BaseException:
            self.destroy()
            raise

    def _resume_games(self, checkpoint: dict) -> bool:
        """Go on with the checkpoint's games in progress and this rank's random state; where it
        has none that fit this run, say why in one line and keep the new games. True if resumed."""
        ranks, world = checkpoint.get("ranks"), self.partner.world_size
        if ranks is None:
            why = "it holds none (it was written before games were saved)"
        elif len(ranks) != world or any(len(r["games"]) != self.n_workers for r in ranks):
            saved = f"{len(ranks)} rank(s) x {len(ranks[0]['games'])} workers"
            why = f"its games are {saved}, this run's {world} x {self.n_workers}"
        else:
            why = None
        if why is not None:
            print(f"Starting new games, not the checkpoint's: {why}")
            return False
        mine = ranks[self.partner.rank]
        for worker, game in zip(self.workers, mine["games"]):
            worker.send("set_state", {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in game.items()})
        for i, worker in enumerate(self.workers):
            worker.receive()
            self.obs[i] = worker.obs
        torch.set_rng_state(mine["torch_rng"])
        set_cuda_rng_state(mine["cuda_rng"], self.device)
        return True

    def _autocast(self):
        # a CUDA graph must cast the weights on every replay: no cached casts
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, self.autocast_dtype, enabled=enabled, cache_enabled=not self.graphs)

    def sample(self) -> Dict[str, torch.Tensor]:
        """Sample `worker_steps` steps from each worker with the current policy."""
        self.model.eval()
        games = []
        with torch.no_grad(), self._autocast(), speed.torch_threads(self.run_settings.rollout_threads):
            for t in range(self.worker_steps):
                obs = torch.from_numpy(self.obs)  # [n_workers, 4, 84, 84] uint8
                self.rollout_obs[:, t] = obs
                a, self.log_pis[:, t], self.values[:, t] = self.act(obs)
                self.actions[:, t] = a.cpu()
                for worker, action in zip(self.workers, self.actions[:, t].tolist()):
                    worker.send("step", action)
                for w, worker in enumerate(self.workers):
                    self.rewards[w, t], self.done[w, t], info = worker.receive()
                    self.obs[w] = worker.obs
                    if info:
                        games.append(info)
            # V of the state after the final step, to bootstrap unfinished episodes
            _, self.values[:, self.worker_steps] = self.model(torch.from_numpy(self.obs).to(self.device))
        games = self.partner.all_games(games)  # under torchrun, the games of every rank count
        self.env_steps += self.batch_size * self.partner.world_size
        for info in games:
            self.episode_rewards.append(info["reward"])
            self.episode_lengths.append(info["length"])
        self.games = games

        values = self.values.cpu().numpy()
        advantages = self.gae(self.done, self.rewards, values)
        returns = values[:, :-1] + advantages  # how much of the returns' variance V explains, for monitoring
        var_returns = returns.var()
        unexplained = (returns - values[:, :-1]).var()
        self.explained_variance = float(1 - unexplained / var_returns) if var_returns > 0 else float("nan")

        samples = {
            "obs": self.rollout_obs,
            "actions": self.actions,
            "values": self.values[:, :-1],
            "log_pis": self.log_pis,
            "advantages": torch.from_numpy(advantages),
        }
        # [n_workers, worker_steps, ...] -> [batch_size, ...] for training
        samples = {
            k: v.reshape(self.batch_size, *v.shape[2:]).to(self.device, non_blocking=True) for k, v in samples.items()
        }
        if self.run_settings.channels_last and not self.graphs:
            # NHWC once per update; every minibatch gathered from it keeps that layout
            samples["obs"] = samples["obs"].contiguous(memory_format=torch.channels_last)
        return samples

    def _act(self, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Actions sampled from pi for a batch of observations, their log-probabilities and V
        (called through `self.act`, which replays it as a CUDA graph where it can)."""
        pi, v = self.model(inputs["obs"])
        a = pi.sample()
        return a, pi.log_prob(a), v

    def train(self, samples: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Train the model on `samples`; returns the mean of each tracked statistic."""
        self.model.train()
        stats: List[torch.Tensor] = []
        used: List[List[float]] = []  # the dynamic values each minibatch used, in MINIBATCH_DYNAMIC's order
        self.partner.hold_dynamic(self)  # under torchrun, rank 0's values, held by every rank for the update
        epochs = self.epochs()  # read once per update: a change applies from the next update
        for _ in range(epochs):
            indexes = torch.randperm(self.batch_size, device=self.device)
            for start in range(0, self.batch_size, self.mini_batch_size):
                mini_batch_indexes = indexes[start : start + self.mini_batch_size]
                # read at every minibatch, so a change from the dashboard applies at once
                lr = self.current_learning_rate()
                dynamic = {name: getattr(self, name)() for name in MINIBATCH_DYNAMIC}
                stats.append(self.train_step(samples, mini_batch_indexes, lr, dynamic))
                used.append(list(dynamic.values()))
                self.optimizer_steps += 1
        # under torchrun, the means over the whole job's minibatches
        means = self.partner.average(torch.stack(stats).double().mean(0))
        result = dict(zip(STATS, means.cpu().tolist()))
        result.update(zip(MINIBATCH_DYNAMIC, np.mean(used, axis=0).tolist()))
        result.update(learning_rate=lr, epochs=epochs)
        return result

    def _train_step(self, mini_batch: Dict[str, torch.Tensor], **dynamic) -> torch.Tensor:
        """One gradient step on a minibatch; returns its statistics. The dynamic values are floats,
        or zero-dimensional device tensors inside a CUDA graph."""
        loss, stats = self._calc_loss(mini_batch, **dynamic)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.partner.average_gradients(self.model.parameters())  # under torchrun, the ranks' mean
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.configs.max_grad_norm)
        self.optimizer.step()
        return stats

    def current_learning_rate(self) -> float:
        """The dynamic learning rate, scaled by the schedule: linear anneals it to 0 at `updates`."""
        if self.configs.lr_schedule == "linear":
            return self.learning_rate() * (1.0 - self.update / self.updates)
        return self.learning_rate()

    def _normalize(self, adv: torch.Tensor) -> torch.Tensor:
        mean, std = self.partner.mean_std(adv)  # under torchrun, over every rank's share of the minibatch
        return (adv - mean) / (std + 1e-8)

    def _calc_loss(self, samples: Dict[str, torch.Tensor], clip_range, value_loss_coef, entropy_bonus_coef):
        """The total loss of a minibatch, and the statistics to track (in the order of `STATS`)."""
        # R_t, the returns sampled from pi_OLD
        sampled_return = samples["values"] + samples["advantages"]
        # normalised advantages: a little bias for much lower variance
        sampled_normalized_advantage = self._normalize(samples["advantages"])
        with self._autocast():
            pi, value = self.model(samples["obs"])
        log_pi = pi.log_prob(samples["actions"])
        policy_loss = self.ppo_loss(log_pi, samples["log_pis"], sampled_normalized_advantage, clip_range)
        entropy_bonus = pi.entropy().mean()
        value_loss = self.value_loss(value, samples["values"], sampled_return, clip_range)
        # L^{CLIP+VF+EB} = L^{CLIP} + c_1 L^{VF} - c_2 L^{EB}
        loss = policy_loss + value_loss_coef * value_loss - entropy_bonus_coef * entropy_bonus
        # an estimate of KL(pi_OLD || pi) for monitoring (Schulman's "approximating KL" note)
        approx_kl_divergence = 0.5 * ((samples["log_pis"] - log_pi) ** 2).mean()
        stats = [-policy_loss, value_loss, entropy_bonus, approx_kl_divergence, self.ppo_loss.clip_fraction]
        return loss, torch.stack(stats).detach()

    def run_training_loop(self, after_update: Optional[Callable[[Dict[str, float]], None]] = None):
        """Sample, train, report, repeat; `after_update(stats)` keeps the run's files."""
        for update in monit.loop(range(self.update, self.updates)):
            start, env_steps = time.perf_counter(), self.env_steps
            samples = self.sample()
            stats = self.train(samples)
            # under torchrun, every rank stops at the update where any was asked to; a signal that
            # comes after this point is too late for this update's checkpoint, and stops the next
            self.stop_requested = self.partner.largest(self.stop_requested)
            stopping = bool(self.stop_requested)
            self.update = update + 1
            stats["explained_variance"] = self.explained_variance
            stats["steps_per_second"] = (self.env_steps - env_steps) / (time.perf_counter() - start)
            if self.episode_rewards:
                stats["reward"] = float(np.mean(self.episode_rewards))
                stats["length"] = float(np.mean(self.episode_lengths))
            tracker.set_global_step(self.env_steps)
            tracker.save(stats)
            self.checkpointing = self.checkpoint_due()  # decided once, on every rank alike
            if self.checkpointing:  # under torchrun, rank 0 gathers every rank's part of it
                self.ranks_state = (self.update, self.partner.gather(self.rank_state()))
            if after_update is not None:
                after_update(stats)
            if self.update % 1_000 == 0:
                logger.log()
            if stopping:
                break

    def checkpoint_due(self) -> bool:
        """A checkpoint is written every `checkpoint_every` updates, at the last, and at a stop."""
        every = self.run_settings.checkpoint_every
        return self.update % every == 0 or self.update == self.updates or bool(self.stop_requested)

    def rank_state(self) -> dict:
        """This process's part of a checkpoint: its games in progress (`Game.get_state()`, arrays as
        tensors), its latest observations and its random state."""
        for worker in self.workers:
            worker.send("get_state")
        games = [worker.receive() for worker in self.workers]
        as_tensors = [{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in g.items()} for g in games]
        return {
            "games": as_tensors,
            "obs": torch.from_numpy(self.obs.copy()),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng_state(self.device),
        }

    def state_dict(self) -> dict:
        """Everything needed to go on exactly: the weights, Adam's state, the counters, the dynamic
        hyperparameters' current values, every rank's games in progress and random state. Plain
        types and tensors only, so `torch.load(weights_only=True)` reads it without running code."""
        if self.ranks_state is not None and self.ranks_state[0] == self.update:
            ranks = self.ranks_state[1]  # gathered in the loop, from every rank
        else:
            ranks = [self.rank_state()]  # called outside the loop: this process's alone
        configs = dataclasses.asdict(self.configs)
        configs.update({name: getattr(self, name)._value for name in DYNAMIC})
        optimizer = self.optimizer.state_dict()
        for group in optimizer["param_groups"]:
            # a float, not the CUDA graph's device tensor, so the checkpoint loads on any device
            group.update(lr=float(group["lr"]), capturable=False)
        return {
            "configs": configs,
            "n_actions": self.model.pi_logits.out_features,
            "model": self.model.state_dict(),
            "optimizer": optimizer,
            "update": self.update,
            "env_steps": self.env_steps,
            "optimizer_steps": self.optimizer_steps,
            "episode_rewards": list(self.episode_rewards),
            "episode_lengths": list(self.episode_lengths),
            "torch_rng": ranks[0]["torch_rng"],
            "cuda_rng": ranks[0]["cuda_rng"],
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict):
        state = copy.deepcopy(state)  # Adam adopts the tensors it is given: training must not alter `state`
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.update, self.env_steps = state["update"], state["env_steps"]
        self.optimizer_steps = state["optimizer_steps"]
        self.episode_rewards.extend(state["episode_rewards"])
        self.episode_lengths.extend(state["episode_lengths"])
        torch.set_rng_state(state["torch_rng"])
        set_cuda_rng_state(state["cuda_rng"], self.device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    def destroy(self):
        """Stop and join every worker process."""
        for worker in self.workers:
            worker.request_close()
        for worker in self.workers:
            worker.close()
        self.workers = []


# ## Entry point
#
# The experiment run with labml. The tools beside this file do the rest: cli.py reads the flags and
# the stop signals, run_files.py keeps the run folder, dashboard.py finds the dashboard, and under
# torchrun distributed.py joins this process to the job's others.

# what `python ppo_breakout.py` needs beside it: the module below it, its tools, labml's project file
SCRIPT_FILES = (
    "ppo_breakout.py",
    "speed.py",
    "cli.py",
    "run_files.py",
    "plots.py",
    "evaluate.py",
    "dashboard.py",
    "distributed.py",
    ".labml.yaml",
)
TOOLS = {"evaluate": "evaluate", "plot": "plots", "export": "run_files", "dashboard": "dashboard"}  # subcommand: module


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank of a torchrun job: distributed.py joins the others
        return importlib.import_module("distributed").main(argv)
    import cli

    configs, run_settings, checkpoint, comment, dashboard_flag = cli.parse(argv)  # one line, exit 2 on bad input
    given = tuple(cli.given_flags(argv))
    return train(configs, run_settings, checkpoint, comment, dashboard_flag, given=given)


def train(
    configs: Configs,
    run_settings: Optional[RunSettings] = None,
    checkpoint: Optional[dict] = None,
    comment: Optional[str] = None,
    dashboard_flag: str = "off",
    partner=None,
    rank_seed: Optional[int] = None,
    given: Tuple[str, ...] = (),
) -> int:
    """Train, reporting to labml; its exit status. Under torchrun (`partner`, the job's
    `distributed.Ranks`), rank 0 alone reports and keeps the run folder, and each rank draws its
    actions from a stream seeded by `rank_seed`. `given`: the settings the command line gave, which
    labml records as explicitly specified (the dashboard lists them apart from the defaults)."""
    import cli
    import dashboard
    import plots
    import run_files

    run_settings = run_settings or RunSettings()
    partner = partner or OneProcess()
    lead = partner.rank == 0
    url = dashboard.connect(dashboard_flag) if lead else None
    if lead:
        writers = {"screen", "sqlite"} | ({"web_api"} if url else set())
        experiment.create(name="ppo_breakout", comment=comment, writers=writers)
    run = run_files.RunFolder(run_settings, checkpoint, partner) if lead else None
    trainer = None

    def after_update(stats: Dict[str, float]):
        if run is not None and run.keep(trainer, stats):  # the metrics every update, a checkpoint when due
            plots.refresh_curve(run.path)

    try:
        trainer = Trainer(configs, run_settings, checkpoint=checkpoint, partner=partner)
        if rank_seed is not None and not trainer.resumed_games:  # a resumed rank has its own random state
            torch.manual_seed(rank_seed)
        if lead:
            hyperparams = {k: getattr(trainer, k) for k in DYNAMIC}
            settings = {**dataclasses.asdict(configs), **dataclasses.asdict(run_settings), **hyperparams}
            settings["resumed_from"] = comment or ""
            # labml prints the comment, the run a resumed one continues, under the run's name; the
            # settings given on the command line are recorded as specified, the rest as defaults
            experiment.configs(settings, {name: settings[name] for name in given if name in settings})
        with (
            # torchrun passes its own second signal on to its ranks: theirs does not stop at once
            cli.stop_handlers(trainer, again_stops=not partner.torchrun),
            experiment.start() if lead else contextlib.nullcontext(),
        ):
            if url:
                dashboard.claim_run(url, experiment.get_uuid())
            trainer.run_training_loop(after_update)
    except (KeyboardInterrupt, cli.StopRequested, WorkerError, run_files.RunFileError, OSError) as e:
        return cli.exit_code(e, run, partner)
    finally:
        if trainer is not None:
            trainer.destroy()
    if trainer.stop_requested and lead:
        print(flush=True)  # end labml's progress line, so this one stands on its own
        print(f"Stopped at update {trainer.update}; checkpoint and metrics are in {run.path}", file=sys.stderr)
    return 128 + trainer.stop_requested if trainer.stop_requested else 0


if __name__ == "__main__":
    # The tools import this file as the module `ppo_breakout`; run that module's main, so that
    # they and it share one copy, not a second one named __main__.
    import ppo_breakout

    sys.exit(ppo_breakout.main())
