"""
# PPO on Atari Breakout, in one file

Proximal Policy Optimization ([Schulman et al. 2017](https://arxiv.org/abs/1707.06347)) with
Generalized Advantage Estimation ([Schulman et al. 2015](https://arxiv.org/abs/1506.02438)),
trained on Atari games from the Arcade Learning Environment with the evaluation protocol of
published Breakout results ([Mnih et al. 2015](https://www.nature.com/articles/nature14236),
[Machado et al. 2018](https://arxiv.org/abs/1709.06009) for the settings we do *not* use).

It follows labml.ai's annotated PPO experiment (labml-nn 0.5.1: `labml_nn/rl/ppo/experiment.py`,
`rl/game.py`, `rl/ppo/gae.py`, `rl/ppo/__init__.py`), keeping its shape and names, on today's
packages (gymnasium-era ale-py with its own ROMs, labml 0.4.168's dynamic hyperparameters).

    pip install -r requirements.txt
    python ppo_breakout.py                          # the default experiment: 10,000 updates
    python ppo_breakout.py --updates 3 --n-workers 2  # a quick smoke run
    python ppo_breakout.py --help                   # every setting with its default
    python ppo_breakout.py --resume logs/ppo_breakout/<run>        # go on from its newest checkpoint
    python ppo_breakout.py evaluate logs/ppo_breakout/<run> --video game.mp4
    python ppo_breakout.py plot logs/ppo_breakout/<run> -o curve.png
    python ppo_breakout.py dashboard                # the labml dashboard, offline (dashboard.py)

The file reads top to bottom in the order the data flows:
configuration -> Game -> worker processes -> Model -> GAE -> losses -> Trainer -> checkpoint files
-> evaluation and plots -> entry point.
"""

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# Python drops a KeyboardInterrupt raised inside some callbacks ("Exception ignored in ...": one
# runs when an import releases its module lock), and a run started as a script would then go on as
# if Ctrl-C never came. So until the trainer installs its own handler, Ctrl-C is remembered as well
# as raised, and `install_stop_handlers` stops the start-up if one was dropped.
ctrl_c_pressed = False


def note_ctrl_c(signum, frame):
    global ctrl_c_pressed
    ctrl_c_pressed = True


def remember_ctrl_c(signum, frame):
    note_ctrl_c(signum, frame)
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGINT, remember_ctrl_c)

try:
    import numpy as np
    import torch
    from labml import experiment, logger, monit, tracker
    from labml.configs import FloatDynamicHyperParam, IntDynamicHyperParam
    from labml.internal.configs.dynamic_hyperparam import DynamicHyperParam
    from torch import nn, optim
    from torch.distributions import Categorical
except KeyboardInterrupt:  # Ctrl-C in the second or two torch takes to load: nothing exists yet
    print("\nStopped by Ctrl-C while loading; nothing was started", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)

if __name__ == "__main__":
    # the rest of the module only defines things, in milliseconds, outside any handling of
    # KeyboardInterrupt: a Ctrl-C there is noted, and raised where `main` starts (at the end)
    signal.signal(signal.SIGINT, note_ctrl_c)

# ## Configuration
#
# Every default lives here, with why. `DYNAMIC` marks the settings that may change while a run
# goes on (from the labml dashboard); they are read by calling them where they are used.


@dataclasses.dataclass
class Configs:
    # number of updates; each samples `n_workers * worker_steps` steps, then trains on them
    updates: int = 10_000
    # ⚙️ passes over each batch of samples; more learns faster per sample but is less stable
    epochs: int = 8
    # game processes stepping in parallel; 8 as in the PPO paper's Atari runs
    n_workers: int = 8
    # steps each worker takes per update (the rollout length T); 128 as in the PPO paper
    worker_steps: int = 128
    # minibatches per epoch: 8 x 128 / 4 = 256 samples each
    batches: int = 4
    # ⚙️ c_1, weight of the value-function loss
    value_loss_coef: float = 0.5
    # ⚙️ c_2, weight of the entropy bonus that keeps the policy exploring
    entropy_bonus_coef: float = 0.01
    # ⚙️ epsilon, how far the probability ratio may move from 1 before the gradient stops
    clip_range: float = 0.1
    # ⚙️ Adam's step size, dashboard range 0..1e-3 as in labml's experiment
    learning_rate: float = 1e-3
    # "constant" (labml), or "linear": learning_rate x (1 - update / updates), annealed to 0
    # (the PPO paper's Atari setting and CleanRL's); the dashboard's value is the one scaled
    lr_schedule: str = "constant"
    # Adam's epsilon; CleanRL and the baselines use 1e-5 for PPO on Atari
    adam_eps: float = 1e-8
    # orthogonal weights (gain sqrt 2, policy head 0.01, value head 1) and zero biases, as in the
    # openai/baselines and CleanRL PPO; off: PyTorch's default initialisation, as in labml
    orthogonal_init: bool = False
    # discount factor of the return
    gamma: float = 0.99
    # GAE's lambda: 0.95 trades a little bias for much lower variance (GAE paper, section 6)
    lambda_: float = 0.95
    # seeds the model, the sampling and, through a SeedSequence, each worker's game
    seed: int = 1
    # any ROM that ale-py ships ("breakout", "pong", "space_invaders", ...)
    game: str = "breakout"
    # "auto" takes the CUDA GPU when there is one, else the CPU
    device: str = "auto"
    # train on the sign of the reward, as DQN and PPO did; scores are always reported unclipped
    clip_rewards: bool = True
    # gradients are clipped to this global norm, as in labml's and the baselines' PPO
    max_grad_norm: float = 0.5
    # "auto": bf16 autocast where the hardware computes bf16 natively (CUDA, AVX-512 bf16/AMX
    # CPUs), fp32 elsewhere (on an AVX2-only CPU bf16 is emulated and ~10x slower); losses stay fp32
    precision: str = "auto"
    # NHWC convolutions: the update 1.3 to 1.5x faster on the CPU with oneDNN
    channels_last: bool = True
    # keep memory the update frees in the process's heap for the next minibatch (glibc's malloc),
    # instead of handing it back to the OS and faulting it in again page by page: a minibatch 1.22x
    # faster on 2 CPU cores (see `reuse_freed_memory`); off: glibc's own thresholds. Nothing
    # changes where malloc is not glibc's
    reuse_freed_memory: bool = True
    # torch threads during the rollout, on any device: its forward passes are batches of n_workers
    # and its CPU copies are small, so threads cost more than they save (1 thread: rollout 1.16 to
    # 1.37x faster on 2 CPU cores; 2.1 to 2.6x on a 16-core H100 machine, where torch's idle
    # threads spun on the workers' cores). Training keeps all of torch's threads. 0: torch's own
    # thread count throughout
    rollout_threads: int = 1
    # the workers split into this many groups that take turns, so one group's games step while the
    # model picks the next group's actions (the same policy, overlapped); 1: lockstep. Off by
    # default: 2 groups gave an H100 loop of 2,424 against 2,242 steps/s (one run each) and were
    # within the noise on 2 CPU cores; 4 were slower on both
    rollout_groups: int = 1
    # on a CUDA GPU, replay each minibatch's update and each rollout step's forward pass as a CUDA
    # graph: the model is small, so launching its dozens of kernels one by one from Python costs more
    # than running them (H200, default configuration: loop 3,524 and 3,789 env steps/s against
    # 1,734 and 1,982 without; a minibatch 1 ms against 5 to 6). Ignored on the CPU
    cuda_graphs: bool = True
    # a checkpoint every this many updates (and at the end, and on Ctrl-C / SIGTERM / hang-up)
    checkpoint_every: int = 50
    # the newest checkpoints kept in the run folder; older ones are deleted
    keep_checkpoints: int = 3


# The help text of each flag: the comment above each field says the same for readers of the file.
HELP = {
    "updates": "number of updates (sample, then train)",
    "epochs": "passes over each batch of samples (dynamic)",
    "n_workers": "game worker processes",
    "worker_steps": "steps each worker takes per update",
    "batches": "minibatches per epoch; must divide n_workers * worker_steps",
    "value_loss_coef": "weight of the value-function loss (dynamic)",
    "entropy_bonus_coef": "weight of the entropy bonus (dynamic)",
    "clip_range": "PPO clip range epsilon, in (0, 1) (dynamic)",
    "learning_rate": "Adam learning rate (dynamic; with --lr-schedule linear, the value the schedule scales)",
    "lr_schedule": "constant, or linear: anneal the learning rate to 0 at the last update",
    "adam_eps": "Adam's epsilon",
    "orthogonal_init": "orthogonal initialisation of the model (baselines / CleanRL)",
    "gamma": "discount factor, in [0, 1]",
    "lambda_": "GAE lambda, in [0, 1]",
    "seed": "random seed",
    "game": "an Atari ROM that ale-py ships",
    "device": "auto, cpu, cuda or cuda:N (on CUDA, cuDNN's autotuner picks the convolution kernels)",
    "clip_rewards": "train on the sign of the game reward",
    "max_grad_norm": "global gradient-norm clip",
    "precision": "auto, fp32 or bf16 (autocast; losses stay fp32)",
    "channels_last": "NHWC memory format for the convolutions",
    "reuse_freed_memory": "keep freed memory in the heap for the next minibatch instead of returning it to the "
    "OS (glibc's mallopt, process-wide)",
    "rollout_threads": "torch threads while sampling, on any device (0: torch's default)",
    "rollout_groups": "groups of workers that take turns, so games step while the model picks the "
    "next group's actions (1: all in lockstep)",
    "cuda_graphs": "on a CUDA GPU, replay the update's minibatch step and the rollout's forward pass as CUDA graphs",
    "checkpoint_every": "updates between checkpoints (also saved at the end and on Ctrl-C/SIGTERM/hang-up)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
}


class CheckedValue:
    """A dynamic hyperparameter that keeps the dashboard's value inside its range.

    labml applies a dashboard change in its web-API thread: a value out of range is clamped, and
    one that is not a finite number is refused, so neither can crash or derail the run."""

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


class CheckedIntDynamicHyperParam(CheckedValue, IntDynamicHyperParam):
    pass


class CheckedFloatDynamicHyperParam(CheckedValue, FloatDynamicHyperParam):
    pass


# The dynamic hyperparameters: labml class and the range the dashboard offers. A value given on
# the command line outside the range widens it, so a user's choice is never silently changed.
DYNAMIC = {
    "epochs": (CheckedIntDynamicHyperParam, (1, 32)),
    "value_loss_coef": (CheckedFloatDynamicHyperParam, (0.0, 1.0)),
    "entropy_bonus_coef": (CheckedFloatDynamicHyperParam, (0.0, 0.1)),
    "clip_range": (CheckedFloatDynamicHyperParam, (0.01, 0.5)),
    "learning_rate": (CheckedFloatDynamicHyperParam, (0.0, 1e-3)),
}
# the dynamic values every minibatch reads, besides the learning rate, in the order the loss takes them
MINIBATCH_DYNAMIC = ("clip_range", "value_loss_coef", "entropy_bonus_coef")


def dynamic_hyperparam(name: str, value) -> DynamicHyperParam:
    """A labml dynamic hyperparameter for `name`, starting at `value` (or `value` itself)."""
    if isinstance(value, DynamicHyperParam):
        return value
    kind, (low, high) = DYNAMIC[name]
    return kind(value, (min(low, value), max(high, value)))


def config_errors(c: Configs) -> List[Tuple[str, str]]:
    """Every problem with `c`, as (flag, problem); empty when the configuration can run."""
    errors = []
    for name in ("updates", "epochs", "n_workers", "worker_steps", "batches", "checkpoint_every", "keep_checkpoints"):
        if getattr(c, name) <= 0:
            errors.append((name, f"must be a positive integer, got {getattr(c, name)}"))
    batch_size = c.n_workers * c.worker_steps
    if c.batches > 0 and batch_size > 0 and batch_size % c.batches != 0:
        errors.append(("batches", f"{c.batches} does not divide the batch " f"n_workers * worker_steps = {batch_size}"))
    for name in ("learning_rate", "value_loss_coef", "entropy_bonus_coef", "max_grad_norm"):
        if not getattr(c, name) >= 0:
            errors.append((name, f"must not be negative, got {getattr(c, name)}"))
    if not 0 < c.clip_range < 1:
        errors.append(("clip_range", f"must be in (0, 1), got {c.clip_range}"))
    for name in ("gamma", "lambda_"):
        if not 0 <= getattr(c, name) <= 1:
            errors.append((name, f"must be in [0, 1], got {getattr(c, name)}"))
    if rom_path(c.game) is None:
        errors.append(
            ("game", f"ale-py ships no ROM named {c.game!r} " f"(for example: breakout, pong, space_invaders)")
        )
    if c.lr_schedule not in ("constant", "linear"):
        errors.append(("lr_schedule", f"must be constant or linear, got {c.lr_schedule!r}"))
    cpus = os.cpu_count() or 1
    if c.rollout_threads < 0:
        errors.append(("rollout_threads", f"must be 0 or more, got {c.rollout_threads}"))
    elif c.rollout_threads > cpus:
        # more threads than CPUs only wait on each other, and tens of thousands crash torch
        errors.append(("rollout_threads", f"must be at most this machine's {cpus} CPUs, got {c.rollout_threads}"))
    problem = seed_problem(c.seed)
    if problem:
        errors.append(("seed", problem))
    if not 1 <= c.rollout_groups <= max(c.n_workers, 1):
        errors.append(("rollout_groups", f"must be between 1 and n_workers ({c.n_workers}), got {c.rollout_groups}"))
    if not c.adam_eps > 0:
        errors.append(("adam_eps", f"must be positive, got {c.adam_eps}"))
    if c.precision not in ("auto", "fp32", "bf16"):
        errors.append(("precision", f"must be auto, fp32 or bf16, got {c.precision!r}"))
    problem = device_problem(c.device)
    if problem:
        errors.append(("device", problem))
    elif not errors:
        errors += memory_errors(c)
    return errors


# Memory a run holds at its peak, measured with bench.py's sum of proportional set sizes on 2 CPU
# cores (8 workers: 728 MiB at 128 steps and 4 minibatches, 1,613 MiB at 1,024 steps and 16,
# 3,796 MiB at 1,024 steps and 1) and rounded up. The peak grew by ~116 KiB a sample, more than
# its 28 KiB of uint8 frames and their NHWC copy, and by ~290 KiB a minibatch sample: its float
# input, activations and gradients, alive during its backward pass (on a GPU, in the GPU's memory,
# not counted here).
MEMORY_BASE = 288 * 2**20
MEMORY_PER_WORKER = 32 * 2**20
MEMORY_PER_SAMPLE = 128 * 2**10
MEMORY_PER_MINIBATCH_SAMPLE = 320 * 2**10


def physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None  # not every platform says


def memory_errors(c: Configs) -> List[Tuple[str, str]]:
    """A run that cannot fit in this machine's memory is refused before it starts anything:
    otherwise it dies with an allocator's traceback, or starts more workers than the machine holds."""
    total = physical_memory()
    samples = c.n_workers * c.worker_steps
    workers = MEMORY_BASE + c.n_workers * MEMORY_PER_WORKER
    needed = workers + samples * MEMORY_PER_SAMPLE
    minibatches = ""
    if select_device(c.device).type == "cpu":
        needed += samples // c.batches * MEMORY_PER_MINIBATCH_SAMPLE
        minibatches = f" in minibatches of {samples // c.batches}"
    if total is None or needed <= total:
        return []
    have = f"more than this machine's {total / 2**30:.1f} GiB"
    if workers > total:
        return [("n_workers", f"{c.n_workers} worker processes need about {workers / 2**30:,.1f} GiB, {have}")]
    return [
        (
            "worker_steps",
            f"{c.n_workers} workers x {c.worker_steps} steps{minibatches} need about {needed / 2**30:,.1f} GiB "
            f"of memory, {have}",
        )
    ]


def seed_problem(seed: int) -> Optional[str]:
    """torch.manual_seed takes at most 64 bits."""
    if seed < 0:
        return f"must be 0 or more, got {seed}"
    if seed >= 2**64:
        return f"must be less than 2**64 (torch seeds are 64-bit), got {seed}"
    return None


def device_problem(name: str) -> Optional[str]:
    """What is wrong with the device `name`, or None when it can be used."""
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except RuntimeError:
        return f"not a device: {name!r} (use auto, cpu, cuda or cuda:N)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{name} was asked for but CUDA is not available"
    if device.type not in ("cpu", "cuda"):
        return f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)"
    return None


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs that compute bf16 natively (AVX-512 bf16 or AMX); elsewhere it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `precision`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


# glibc's malloc serves a large block with its own mmap and unmaps it when freed, and it trims the
# heap's free top; each minibatch then allocates its tens of MB again (the float input alone is
# 29 MB) and the kernel faults every 4 KiB page in anew, zeroed. In the default configuration on
# 2 CPU cores that was 400 to 6,600 page faults a minibatch (up to 16,000 and 45 ms of kernel
# time in a bare loop of minibatches). With both thresholds raised, freed blocks stay in the heap
# and the next minibatch reuses them: 0 to a few hundred faults, and a minibatch 1.22x faster
# (median of five interleaved runs, 128 against 154 ms; README, speed section).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 << 20  # the most glibc accepts on 64-bit: larger blocks are still mapped
TRIM_THRESHOLD = 1 << 30  # free heap kept before glibc returns any: above a default run's peak


def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse, for this process (and workers forked after it).
    False where malloc is not glibc's (macOS, musl): nothing is changed there."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# ## Game
#
# One Atari game, seen the way published Breakout results see it ("NoFrameskip-v4" with the
# DQN preprocessing): no sticky actions, a 108,000-frame cap, each action repeated 4 frames with
# the max of the last two (Atari sprites flicker between frames), grey 84x84, the last 4 frames
# stacked, up to 30 no-ops at the start of a game, and FIRE to launch the ball where the game needs it.
#
# labml's `game.py` reset the whole game at every lost life, so its reported "reward" was a
# one-life score. Here a lost life only ends the *training* episode (`done`, which cuts GAE);
# the game goes on, and the score reported in `info` is the whole game over all lives.

FRAME_SKIP = 4  # frames per agent step (Mnih et al. 2015)
NOOP_MAX = 30  # at most this many no-op frames at the start of a game, for varied starts
MAX_FRAMES = 108_000  # 30 minutes of play at 60 frames/s: the standard cap
FRAME_SIZE = 84  # observations are 84x84 grey
FRAME_STACK = 4  # the model sees the last 4 frames, to perceive motion
OBS_SHAPE = (FRAME_STACK, FRAME_SIZE, FRAME_SIZE)


def rom_path(game: str) -> Optional[str]:
    """Path of the ROM that ale-py ships for `game`, or None."""
    from ale_py import roms

    if game not in roms.get_all_rom_ids():
        return None
    return str(roms.get_rom_path(game))


def minimal_actions(game: str) -> List[int]:
    """The game's minimal action set (4 for Breakout: NOOP, FIRE, RIGHT, LEFT)."""
    return list(Game(0, game).actions)


class Game:
    """
    One Atari game inside a worker.

    `reset() -> obs` starts a game; `step(action) -> (obs, reward, done, info)` where `obs` is a
    uint8 array [4, 84, 84], `reward` the training reward (the sign of the game's reward when
    `clip_rewards`), `done` True when a life is lost or the game is over, and `info` None except on
    the step that ends a game: `{"reward": whole-game score, unclipped, "length": agent steps}`.
    The game resets itself when it is over; the returned `obs` is then the new game's first.
    """

    def __init__(self, seed: int, game: str = "breakout", clip_rewards: bool = True):
        import ale_py

        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner per worker
        self.ale = ale_py.ALEInterface()
        self.ale.setInt("random_seed", int(seed) % 2**31)
        self.ale.setFloat("repeat_action_probability", 0.0)
        self.ale.setInt("max_num_frames_per_episode", MAX_FRAMES)
        self.ale.loadROM(rom_path(game))
        self.actions = self.ale.getMinimalActionSet()
        self.fire = ale_py.Action.FIRE if ale_py.Action.FIRE in self.actions else None
        self.clip_rewards = clip_rewards
        self.rng = np.random.default_rng(seed)
        height, width = self.ale.getScreenDims()
        # the last two raw grey frames of a step, for the max over flicker
        self.screens = np.zeros((2, height, width), dtype=np.uint8)
        self.obs_4 = np.zeros(OBS_SHAPE, dtype=np.uint8)
        self.score = 0.0
        self.length = 0
        self.lives = 0
        # when a list, every emulator frame in colour is appended to it (the evaluation video)
        self.frames: Optional[List[np.ndarray]] = None

    def _act(self, action) -> float:
        reward = self.ale.act(action)
        if self.frames is not None:
            self.frames.append(self.ale.getScreenRGB())
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

        frame = cv2.resize(
            np.maximum(self.screens[0], self.screens[1]), (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA
        )
        self.obs_4[:-1] = self.obs_4[1:]
        self.obs_4[-1] = frame

    def step(self, action: int):
        reward = self._repeat(self.actions[action])
        lives = self.ale.lives()
        life_lost = lives < self.lives
        self.lives = lives
        if life_lost and self.fire is not None and not self.ale.game_over():
            # relaunch the ball, or the agent may wait forever for an action it never learnt
            reward += self._repeat(self.fire)
        self.score += reward
        self.length += 1
        game_over = self.ale.game_over()
        done = game_over or life_lost
        if game_over:
            info = {"reward": self.score, "length": self.length}
            self.reset()
        else:
            info = None
            self._push_frame()
        if self.clip_rewards:
            reward = float(np.sign(reward))
        return self.obs_4, reward, done, info

    def reset(self):
        self.ale.reset_game()
        for _ in range(self.rng.integers(1, NOOP_MAX + 1)):
            self._act(self.actions[0])  # the minimal action set starts with NOOP
        if self.fire is not None:
            self._repeat(self.fire)
        self.ale.getScreenGrayscale(self.screens[0])
        self.screens[1] = self.screens[0]
        self._push_frame()
        self.obs_4[:] = self.obs_4[-1]
        self.score = 0.0
        self.length = 0
        self.lives = self.ale.lives()
        return self.obs_4


# ## Worker processes
#
# Each Game runs in its own process. A step, the one command sent thousands of times a second,
# goes through shared memory: the trainer writes the action into the worker's slots and
# releases its `go` semaphore; the worker steps, writes the frame stack (28 KB, in place), the
# reward, `done` and the game's score into shared memory, and releases `ready`. Nothing is
# pickled and a step costs two semaphore operations, which on 2 cores moved 1.2x as many steps
# per second as a Pipe round trip with pickled replies (README, speed section). The rarer
# commands ("reset", None) and ("close", None) travel over a `multiprocessing` Pipe, and so does
# a worker's error report, as ("error", message).

# the worker's shared slots: what `go` and `ready` announce
STEP, PIPE = 0.0, 1.0  # COMMAND: step with ACTION, or read the command from the pipe
FAILED = 1.0  # STATUS, 0 until the worker raised and sent its error over the pipe
COMMAND, ACTION, STATUS, REWARD, DONE, GAME_OVER, SCORE, LENGTH = range(8)
# how often a waiting trainer checks that its worker lives, and a waiting worker its trainer
LIVENESS_CHECK_S = 0.5


class WorkerError(RuntimeError):
    """A worker process died or raised."""


def _die_with_parent(parent_pid: int):
    """Have Linux kill this worker if the trainer dies, even by SIGKILL.

    Elsewhere the worker notices within LIVENESS_CHECK_S that its parent changed, while it waits.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(0)


def worker_process(
    remote: multiprocessing.connection.Connection,
    go,
    ready,
    slots_buffer,
    obs_buffer,
    parent_pid: int,
    seed: int,
    game: str,
    clip_rewards: bool,
):
    # Ctrl-C and a terminal's hang-up go to the whole process group: the trainer handles them
    # and closes us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    slots = np.frombuffer(slots_buffer, dtype=np.float64)
    obs = np.frombuffer(obs_buffer, dtype=np.uint8).reshape(OBS_SHAPE)
    try:
        env = Game(seed, game, clip_rewards)
        while True:
            while not go.acquire(timeout=LIVENESS_CHECK_S):
                if os.getppid() != parent_pid:
                    return  # the trainer is gone
            if slots[COMMAND] == STEP:
                obs[:], reward, done, info = env.step(int(slots[ACTION]))
                slots[REWARD], slots[DONE] = reward, done
                if info is not None:
                    slots[SCORE], slots[LENGTH] = info["reward"], info["length"]
                slots[GAME_OVER] = info is not None
            else:
                cmd, data = remote.recv()
                if cmd == "reset":
                    obs[:] = env.reset()
                elif cmd == "close":
                    return
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            ready.release()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the trainer is gone
    except BaseException as e:
        try:
            remote.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            slots[STATUS] = FAILED
            ready.release()
        except OSError:
            pass
        raise SystemExit(1)
    finally:
        remote.close()


def _mp_context():
    # fork starts 8 workers in milliseconds; the workers never touch torch, so forking a
    # process that has torch threads is safe. Elsewhere (macOS, Windows) spawn is the safe one.
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


class Worker:
    """
    Creates a new worker and runs it in a separate process.

    `send(cmd, data)` and `receive()` are split so a trainer can step all workers at once:
    `send("step", action)`, then `receive() -> (reward, done, info)` with the new frame stack in
    `obs`; `send("reset")`, then `receive() -> None`. `receive()` raises `WorkerError` naming
    the worker when it raised, and within LIVENESS_CHECK_S when it died.
    """

    def __init__(self, seed: int, game: str = "breakout", clip_rewards: bool = True, index: int = 0):
        ctx = _mp_context()
        self.index = index
        self.obs_buffer = ctx.RawArray("B", int(np.prod(OBS_SHAPE)))
        self.obs = np.frombuffer(self.obs_buffer, dtype=np.uint8).reshape(OBS_SHAPE)
        self.slots_buffer = ctx.RawArray("d", LENGTH + 1)
        self.slots = np.frombuffer(self.slots_buffer, dtype=np.float64)
        self.go, self.ready = ctx.Semaphore(0), ctx.Semaphore(0)
        self.child, parent = ctx.Pipe()
        self.process = ctx.Process(
            target=worker_process,
            name=f"ppo-worker-{index}",
            daemon=True,
            args=(
                parent,
                self.go,
                self.ready,
                self.slots_buffer,
                self.obs_buffer,
                os.getpid(),
                seed,
                game,
                clip_rewards,
            ),
        )
        self.process.start()
        parent.close()
        self.closing = False

    def send(self, cmd: str, data=None):
        if cmd == "step":
            self.slots[ACTION] = data
            self.slots[COMMAND] = STEP
        else:
            try:
                self.child.send((cmd, data))
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._raise_dead()
            self.slots[COMMAND] = PIPE
        self.go.release()

    def receive(self):
        while not self.ready.acquire(timeout=LIVENESS_CHECK_S):
            if not self.process.is_alive():
                self._raise_dead()
        if self.slots[STATUS] == FAILED:
            self._raise_dead()
        if self.slots[COMMAND] != STEP:
            return None
        info = None
        if self.slots[GAME_OVER]:
            info = {"reward": float(self.slots[SCORE]), "length": int(self.slots[LENGTH])}
        return float(self.slots[REWARD]), bool(self.slots[DONE]), info

    def _raise_dead(self):
        # a worker that raised sent its error before it exited: that is the cause to report
        try:
            while self.child.poll():
                reply = self.child.recv()
                if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "error":
                    raise WorkerError(f"worker {self.index} raised {reply[1]}")
        except (EOFError, OSError):
            pass
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is not None and code < 0:
            cause = f"killed by signal {signal.Signals(-code).name}"
        else:
            cause = f"exit code {code}"
        raise WorkerError(f"worker {self.index} (pid {self.process.pid}) died: {cause}")

    def step(self, action: int):
        """Blocking step: (obs, reward, done, info), obs a copy of the shared frame stack."""
        self.send("step", int(action))
        reward, done, info = self.receive()
        return self.obs.copy(), reward, done, info

    def reset(self) -> np.ndarray:
        self.send("reset")
        self.receive()
        return self.obs.copy()

    def request_close(self):
        """Ask the worker to stop, without waiting: the trainer asks all of them, then joins each."""
        if not self.closing and self.process.is_alive():
            self.closing = True
            try:
                self.child.send(("close", None))
                self.slots[COMMAND] = PIPE
                self.go.release()
            except OSError:
                pass

    def close(self, timeout: float = 5.0):
        """Ask the worker to stop and join it; terminate it if it does not stop in time."""
        self.request_close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.child.close()


# ## Model
#
# The Nature DQN convolutional network (Mnih et al. 2015) shared by the policy and value heads.


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
            # a small policy head starts near-uniform over actions; sqrt(2) keeps ReLU activations' scale
            for layer, gain in [
                (self.conv1, 2**0.5),
                (self.conv2, 2**0.5),
                (self.conv3, 2**0.5),
                (self.lin, 2**0.5),
                (self.pi_logits, 0.01),
                (self.value, 1.0),
            ]:
                nn.init.orthogonal_(layer.weight, gain)
                nn.init.zeros_(layer.bias)

    def forward(self, obs: torch.Tensor) -> Tuple[Categorical, torch.Tensor]:
        # obs: uint8 [batch, 4, 84, 84], kept uint8 until here: reordered to NHWC while it is
        # still 1 byte a pixel (a no-op for the update's minibatches, gathered from an NHWC batch),
        # then made float and scaled to [0, 1]. Converted first, then divided in place: the same
        # numbers as `obs / 255.0`, whose mixed uint8/float division casts element by element (in a
        # profile of the CPU update, 14.7 ms a minibatch of 256; these two passes take 2 to 3 ms)
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            obs = obs.contiguous(memory_format=torch.channels_last)
        h = obs.float().div_(255.0)
        h = self.activation(self.conv1(h))
        h = self.activation(self.conv2(h))
        h = self.activation(self.conv3(h))
        h = h.reshape((-1, 7 * 7 * 64))
        h = self.activation(self.lin(h))
        # the heads' outputs go back to fp32 under autocast: probabilities and losses need it
        pi = Categorical(logits=self.pi_logits(h).float(), validate_args=False)
        value = self.value(h).float().reshape(-1)
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
        self.lambda_ = lambda_
        self.gamma = gamma
        self.worker_steps = worker_steps
        self.n_workers = n_workers

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

    def forward(
        self, log_pi: torch.Tensor, sampled_log_pi: torch.Tensor, advantage: torch.Tensor, clip: float
    ) -> torch.Tensor:
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

    def forward(
        self, value: torch.Tensor, sampled_value: torch.Tensor, sampled_return: torch.Tensor, clip: float
    ) -> torch.Tensor:
        clipped_value = sampled_value + (value - sampled_value).clamp(min=-clip, max=clip)
        vf_loss = torch.max((value - sampled_return) ** 2, (clipped_value - sampled_return) ** 2)
        return 0.5 * vf_loss.mean()


# ## Trainer
#
# On a GPU the Nature CNN is small: a minibatch's forward, backward and Adam step are dozens of
# kernels that run faster than Python and the driver can launch them one by one. A CUDA graph
# records the kernels of one call once, on fixed input and output buffers, and replays them all
# with one launch; each call then only copies its inputs into those buffers.


# the statistics of each minibatch, in the order the loss returns them
STATS = ("policy_reward", "value_loss", "entropy_bonus", "kl_div", "clip_fraction")


class CudaGraph:
    """`fn(inputs)` recorded as a CUDA graph. Fill `inputs` (a dict of device tensors) in place,
    then call: the recorded kernels run and the same `output` tensors are returned every time,
    so read them before the next call. `fn` first runs 3 times on a side stream, as capture
    requires (cuDNN picks its kernels, Adam makes its state): undo any effect it has."""

    def __init__(self, fn: Callable, inputs: Dict[str, torch.Tensor]):
        self.inputs = inputs
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(inputs)

    def __call__(self):
        self.graph.replay()
        return self.output


def gather_rows(x: torch.Tensor, indexes: torch.Tensor) -> torch.Tensor:
    """`x[indexes]` along the first dimension, copied a whole sample at a time. Advanced indexing
    copies element by element: 4.6 ms against 0.3 ms for a minibatch of 256 frame stacks on the
    CPU. An NHWC batch is gathered as the [batch, 84, 84, 4] rows it is stored as, and stays NHWC."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.index_select(x.permute(0, 2, 3, 1), 0, indexes).permute(0, 3, 1, 2)
    return torch.index_select(x, 0, indexes)


class Trainer:
    """
    Samples from the workers with the current policy, computes advantages, and trains the model
    for `epochs` passes of `batches` minibatches over each batch.

    `Trainer(configs, **overrides)`: any `Configs` field may be overridden by keyword, and the
    dynamic ones may be given as labml dynamic hyperparameters (as labml's experiment did).
    `run_path`, when given, is the folder where `metrics.jsonl` and the checkpoints are written.
    `checkpoint`, a `state_dict()` saved earlier, continues that run from its update.
    """

    def __init__(
        self,
        configs: Optional[Configs] = None,
        run_path: Optional[Path] = None,
        checkpoint: Optional[dict] = None,
        **overrides,
    ):
        plain = {k: (v._value if isinstance(v, DynamicHyperParam) else v) for k, v in overrides.items()}
        c = self.configs = dataclasses.replace(configs or Configs(), **plain)
        errors = config_errors(c)
        if errors:
            raise ValueError("; ".join(f"{name}: {problem}" for name, problem in errors))
        self.updates = c.updates
        self.n_workers = c.n_workers
        self.worker_steps = c.worker_steps
        self.batches = c.batches
        # total number of samples for a single update, and the size of a minibatch
        self.batch_size = self.n_workers * self.worker_steps
        self.mini_batch_size = self.batch_size // self.batches
        # ⚙️ the dynamic hyperparameters, read by calling them where they are used:
        # (self.epochs, self.value_loss_coef, self.entropy_bonus_coef, self.clip_range, self.learning_rate)
        for name in DYNAMIC:
            setattr(self, name, dynamic_hyperparam(name, overrides.get(name, getattr(c, name))))

        self.device = select_device(c.device)
        if self.device.type == "cuda":
            # two input shapes only (the rollout's batch and the minibatch): let cuDNN time its
            # kernels for each once and keep the fastest
            torch.backends.cudnn.benchmark = True
        self.autocast_dtype = select_dtype(c.precision, self.device)
        self.reusing_freed_memory = c.reuse_freed_memory and reuse_freed_memory()
        self.graphs = c.cuda_graphs and self.device.type == "cuda"
        self.act_graphs: Dict[int, CudaGraph] = {}  # one per rollout batch size, made at first use
        self.update_graph: Optional[CudaGraph] = None
        self.graph_dynamic: Optional[List[float]] = None  # the dynamic values the update graph's tensors hold
        torch.manual_seed(c.seed)
        n_actions = len(minimal_actions(c.game))
        self.model = Model(n_actions, c.orthogonal_init).to(self.device)
        if c.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # fused: one kernel for the whole step instead of ~10 passes per parameter (on 2 CPU cores,
        # Adam went from ~9 ms to ~2 ms a minibatch); the same algorithm and the same saved moments
        self.optimizer = optim.Adam(self.model.parameters(), lr=c.learning_rate, eps=c.adam_eps, fused=True)
        self.gae = GAE(self.n_workers, self.worker_steps, c.gamma, c.lambda_)
        self.ppo_loss = ClippedPPOLoss()
        self.value_loss = ClippedValueFunctionLoss()

        self.update = 0  # updates done so far
        self.env_steps = 0  # agent steps taken by all workers together
        self.optimizer_steps = 0
        # whole-game scores and lengths of the last 100 games, reported as their mean
        self.episode_rewards = deque(maxlen=100)
        self.episode_lengths = deque(maxlen=100)
        self.run_path = run_path
        self.games: List[dict] = []  # the games that ended in the latest rollout
        self.explained_variance = float("nan")

        # the rollout buffers, allocated once and reused by every update
        n, t = self.n_workers, self.worker_steps
        self.obs = np.zeros((n, *OBS_SHAPE), dtype=np.uint8)  # the latest observation of each worker
        # pinned on a CUDA machine, so the batch's copy to the GPU is one fast DMA
        pin = self.device.type == "cuda"
        self.rollout_obs = torch.zeros((n, t, *OBS_SHAPE), dtype=torch.uint8, pin_memory=pin)
        self.rewards = np.zeros((n, t), dtype=np.float32)
        self.done = np.zeros((n, t), dtype=bool)
        self.actions = torch.zeros((n, t), dtype=torch.long)
        self.log_pis = torch.zeros((n, t), dtype=torch.float32, device=self.device)
        self.values = torch.zeros((n, t + 1), dtype=torch.float32, device=self.device)

        self.stop_requested = False  # set by Ctrl-C / SIGTERM / SIGHUP: stop after the current update
        if checkpoint is not None:
            self.load_state_dict(checkpoint)

        # worker seeds come from one SeedSequence, so runs with nearby seeds share no game; a
        # resumed run starts new games (the emulators' states are not saved), seeded by its update
        entropy = c.seed if self.update == 0 else [c.seed, self.update]
        seeds = np.random.SeedSequence(entropy).generate_state(self.n_workers)
        self.workers: List[Worker] = []
        try:
            for i in range(self.n_workers):
                self.workers.append(Worker(int(seeds[i]), c.game, c.clip_rewards, index=i))
            for worker in self.workers:
                worker.send("reset")
            for i, worker in enumerate(self.workers):
                worker.receive()
                self.obs[i] = worker.obs
        except BaseException:
            self.destroy()
            raise

    def _autocast(self):
        # a CUDA graph must cast the weights on every replay: no cached casts
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype,
            enabled=self.autocast_dtype is not None,
            cache_enabled=not self.graphs,
        )

    @contextlib.contextmanager
    def _rollout_threads(self):
        """`rollout_threads` torch threads while sampling, all of them again after (on a GPU too:
        the rollout's CPU copies are small, and idle torch threads spin on the workers' cores)."""
        threads = torch.get_num_threads()
        if self.configs.rollout_threads:
            torch.set_num_threads(self.configs.rollout_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def sample(self) -> Dict[str, torch.Tensor]:
        """Sample `worker_steps` steps from each worker with the current policy.

        The workers take turns in `rollout_groups` groups: a group's results of step t - 1 are
        read, the model picks its actions for step t, and they are sent; while the model works
        on one group, the games of the others are stepping. Every game sees the same policy and
        keeps its own order, so the samples are distributed as a lockstep rollout's."""
        self.model.eval()
        games = []
        bounds = np.linspace(0, self.n_workers, self.configs.rollout_groups + 1).astype(int)
        groups = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

        def receive(group: slice, t: int):
            for w in range(group.start, group.stop):
                self.rewards[w, t], self.done[w, t], info = self.workers[w].receive()
                self.obs[w] = self.workers[w].obs
                if info:
                    games.append(info)

        with torch.no_grad(), self._autocast(), self._rollout_threads():
            for t in range(self.worker_steps):
                for g in groups:
                    if t > 0:
                        receive(g, t - 1)
                    obs = torch.from_numpy(self.obs[g])  # [group, 4, 84, 84] uint8
                    self.rollout_obs[g, t] = obs
                    a, self.log_pis[g, t], self.values[g, t] = self._act(obs)
                    actions = a.cpu()
                    self.actions[g, t] = actions
                    for w, action in zip(range(g.start, g.stop), actions.tolist()):
                        self.workers[w].send("step", action)
            for g in groups:
                receive(g, self.worker_steps - 1)
            # V of the state after the final step, to bootstrap unfinished episodes
            _, v = self.model(torch.from_numpy(self.obs).to(self.device))
            self.values[:, self.worker_steps] = v
        self.env_steps += self.batch_size
        for info in games:
            self.episode_rewards.append(info["reward"])
            self.episode_lengths.append(info["length"])
        self.games = games

        values = self.values.cpu().numpy()
        advantages = self.gae(self.done, self.rewards, values)
        returns = values[:, :-1] + advantages
        var_returns = returns.var()
        self.explained_variance = (
            float(1 - (returns - values[:, :-1]).var() / var_returns) if var_returns > 0 else float("nan")
        )

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
        if self.configs.channels_last and not self.graphs:
            # reordered to NHWC once per update, where each of the `epochs x batches` minibatches
            # gathered from it keeps that layout (a CUDA graph gathers into its own fixed buffer)
            samples["obs"] = samples["obs"].contiguous(memory_format=torch.channels_last)
        return samples

    def _act(self, obs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Actions sampled from pi for a batch of observations, their log-probabilities and V."""
        if not self.graphs:
            return self._act_eagerly({"obs": obs.to(self.device)})
        if len(obs) not in self.act_graphs:
            self.act_graphs[len(obs)] = CudaGraph(self._act_eagerly, {"obs": obs.to(self.device)})
        graph = self.act_graphs[len(obs)]
        graph.inputs["obs"].copy_(obs)
        return graph()

    def _act_eagerly(self, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pi, v = self.model(inputs["obs"])
        a = pi.sample()
        return a, pi.log_prob(a), v

    def train(self, samples: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Train the model on `samples`; returns the mean of each tracked statistic."""
        self.model.train()
        stats: List[torch.Tensor] = []
        in_use: List[List[float]] = []  # the dynamic values each minibatch used
        epochs = self.epochs()  # read once per update: a change applies from the next update
        for _ in range(epochs):
            indexes = torch.randperm(self.batch_size, device=self.device)
            for start in range(0, self.batch_size, self.mini_batch_size):
                mini_batch_indexes = indexes[start : start + self.mini_batch_size]
                # read the dynamic values now, so a change from the dashboard applies at once
                dynamic = [self.current_learning_rate(), *(getattr(self, name)() for name in MINIBATCH_DYNAMIC)]
                if self.graphs:
                    stats.append(self._train_graphed(samples, mini_batch_indexes, dynamic).clone())
                else:
                    for pg in self.optimizer.param_groups:
                        pg["lr"] = dynamic[0]
                    mini_batch = {k: gather_rows(v, mini_batch_indexes) for k, v in samples.items()}
                    stats.append(self._train_step(mini_batch, *dynamic[1:]))
                in_use.append(dynamic)
                self.optimizer_steps += 1
        # one device-to-host copy per update instead of one per minibatch
        means = torch.stack(stats).double().mean(0).cpu().tolist()
        return {
            **dict(zip(STATS, means)),
            **dict(zip(MINIBATCH_DYNAMIC, np.mean(in_use, axis=0)[1:].tolist())),
            "learning_rate": in_use[-1][0],
            "epochs": epochs,
        }

    def _train_step(self, mini_batch: Dict[str, torch.Tensor], clip_range, value_loss_coef, entropy_bonus_coef):
        """One gradient step on a minibatch; returns its statistics, in the order of `STATS`. The
        dynamic values are floats, or one-element device tensors inside a CUDA graph."""
        loss, stats = self._calc_loss(mini_batch, clip_range, value_loss_coef, entropy_bonus_coef)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.configs.max_grad_norm)
        self.optimizer.step()
        return stats

    def _train_graphed(self, samples: Dict[str, torch.Tensor], indexes: torch.Tensor, dynamic: List[float]):
        """`_train_step` replayed as a CUDA graph: the minibatch is gathered into the graph's input
        buffers, and the learning rate and the other `dynamic` values into device tensors."""
        if self.update_graph is None:
            self.update_graph = self._capture_train_step(samples)
        inputs = self.update_graph.inputs
        for k, v in samples.items():
            torch.index_select(v, 0, indexes, out=inputs[k])
        if dynamic != self.graph_dynamic:  # a fill is a kernel launch: only when a value changed
            self.optimizer.param_groups[0]["lr"].fill_(dynamic[0])
            for i, value in enumerate(dynamic[1:]):
                inputs["dynamic"][i].fill_(value)
            self.graph_dynamic = dynamic
        return self.update_graph()

    def _capture_train_step(self, samples: Dict[str, torch.Tensor]) -> CudaGraph:
        # Adam reads the learning rate from a device tensor the graph can see change
        group = self.optimizer.param_groups[0]
        group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        group["capturable"] = True
        inputs = {k: v[: self.mini_batch_size].clone() for k, v in samples.items()}
        inputs["dynamic"] = torch.zeros(len(MINIBATCH_DYNAMIC), device=self.device)
        # the capture's warm-up takes real steps: put the weights and Adam's state back after it
        params = list(self.model.parameters())
        weights = [p.detach().clone() for p in params]
        moments = {p: {k: v.clone() for k, v in self.optimizer.state[p].items()} for p in self.optimizer.state}
        graph = CudaGraph(lambda x: self._train_step(x, *x["dynamic"]), inputs)
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
                for k, v in self.optimizer.state[p].items():
                    v.copy_(moments[p][k]) if p in moments else v.zero_()  # none yet: a fresh Adam
        return graph

    def current_learning_rate(self) -> float:
        """The dynamic learning rate, scaled by the schedule: linear anneals it to 0 at `updates`."""
        if self.configs.lr_schedule == "linear":
            return self.learning_rate() * (1.0 - self.update / self.updates)
        return self.learning_rate()

    @staticmethod
    def _normalize(adv: torch.Tensor) -> torch.Tensor:
        return (adv - adv.mean()) / (adv.std() + 1e-8)

    def _calc_loss(
        self, samples: Dict[str, torch.Tensor], clip_range, value_loss_coef, entropy_bonus_coef
    ) -> Tuple[torch.Tensor, torch.Tensor]:
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

    def run_training_loop(self):
        for update in monit.loop(range(self.update, self.updates)):
            start = time.perf_counter()
            samples = self.sample()
            stats = self.train(samples)
            self.update = update + 1
            stats["explained_variance"] = self.explained_variance
            stats["steps_per_second"] = self.batch_size / (time.perf_counter() - start)
            if self.episode_rewards:
                stats["reward"] = float(np.mean(self.episode_rewards))
                stats["length"] = float(np.mean(self.episode_lengths))
            tracker.set_global_step(self.env_steps)
            tracker.save(stats)
            self._write_metrics(stats)
            if self.update % 1_000 == 0:
                logger.log()
            # every checkpoint_every updates, and at the end however the run ends
            if self.update % self.configs.checkpoint_every == 0 or self.update == self.updates or self.stop_requested:
                self.save_checkpoint()
                self.refresh_plot()
            if self.stop_requested:
                break

    # ### Checkpoints
    #
    # Everything needed to go on exactly: the model, Adam's moments, the counters, the
    # configuration with the dynamic hyperparameters' current values, the random state and the
    # last-100-game statistics. Plain types and tensors only, so `torch.load(weights_only=True)`
    # reads it without running any code from the file.

    def state_dict(self) -> dict:
        configs = dataclasses.asdict(self.configs)
        configs.update({name: getattr(self, name)._value for name in DYNAMIC})
        return {
            "format": CHECKPOINT_FORMAT,
            "configs": configs,
            "n_actions": self.model.pi_logits.out_features,
            "model": self.model.state_dict(),
            "optimizer": self._optimizer_state(),
            "update": self.update,
            "env_steps": self.env_steps,
            "optimizer_steps": self.optimizer_steps,
            "episode_rewards": list(self.episode_rewards),
            "episode_lengths": list(self.episode_lengths),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def _optimizer_state(self) -> dict:
        state = self.optimizer.state_dict()
        for group in state["param_groups"]:
            # a float, not the CUDA graph's device tensor, so the checkpoint loads on any device
            group.update(lr=float(group["lr"]), capturable=False)
        return state

    def load_state_dict(self, state: dict):
        state = copy.deepcopy(state)  # Adam adopts the tensors it is given: training must not alter `state`
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.update = state["update"]
        self.env_steps = state["env_steps"]
        self.optimizer_steps = state["optimizer_steps"]
        self.episode_rewards.extend(state["episode_rewards"])
        self.episode_lengths.extend(state["episode_lengths"])
        for name in DYNAMIC:
            getattr(self, name)._value = state["configs"][name]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save_checkpoint(self) -> Optional[Path]:
        """Write `checkpoints/update_NNNNNNN.pt` in the run folder, atomically; keep the newest few."""
        if self.run_path is None or self.update == 0:
            return None
        folder = self.run_path / "checkpoints"
        folder.mkdir(exist_ok=True)
        path = folder / f"update_{self.update:07d}.pt"
        atomic_save(self.state_dict(), path)
        for old in sorted(folder.glob("update_*.pt"))[: -self.configs.keep_checkpoints]:
            old.unlink()
        return path

    def refresh_plot(self):
        """Redraw curve.png in the run folder, for a user without the dashboard; never fatal."""
        if self.run_path is None:
            return
        try:
            plot_runs([self.run_path], self.run_path / "curve.png")
        except Exception as e:
            logger.log(f"curve.png not refreshed: {type(e).__name__}: {e}")

    def _write_metrics(self, stats: Dict[str, float]):
        """One JSON line per update in the run folder: the record that needs no server."""
        if self.run_path is None:
            return
        record = {
            "update": self.update,
            "env_steps": self.env_steps,
            "time": time.time(),
            **stats,
            "games": [[g["reward"], g["length"]] for g in self.games],
        }
        with open(self.run_path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

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


# ## Checkpoint files

CHECKPOINT_FORMAT = 1  # bumped when the checkpoint's contents change


class RunFileError(Exception):
    """A file of a run (checkpoint, metrics) that is missing, unreadable or does not fit; one line."""


class CheckpointError(RunFileError):
    """A checkpoint that is missing, unreadable or does not fit."""


def atomic_save(state: dict, path: Path):
    """Write to a temporary file, flush it to disk, then rename: a kill at any moment leaves
    either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save turns a full disk into a RuntimeError
        tmp.unlink(missing_ok=True)  # a partial file would only fill the disk further
        raise RunFileError(f"cannot write {path}: {os_reason(e)}") from e


def os_reason(e: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device"), wherever in
    the chain of exceptions they are."""
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        e = e.__cause__ or e.__context__
    return "unknown error"


def find_checkpoint(path: Path) -> Path:
    """`path` itself, or the newest checkpoint of the run folder `path`."""
    if path.is_dir():
        found = sorted(path.glob("checkpoints/update_*.pt")) or sorted(path.glob("update_*.pt"))
        if not found:
            raise CheckpointError(f"no checkpoint in {path}")
        return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path, game: Optional[str] = None) -> Tuple[Path, dict]:
    """Read a checkpoint (file or run folder); with `game`, check its policy fits that game."""
    path = find_checkpoint(Path(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint ({type(e).__name__})")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a ppo_breakout checkpoint (format {CHECKPOINT_FORMAT})")
    game = game or state["configs"]["game"]
    if rom_path(game) is None:
        raise CheckpointError(f"ale-py ships no ROM named {game!r}")
    n_actions = len(minimal_actions(game))
    if state["n_actions"] != n_actions:
        raise CheckpointError(
            f"checkpoint {path} has a policy with {state['n_actions']} actions, but {game} has {n_actions}"
        )
    return path, state


# ## Evaluation and plots

VIDEO_FPS = 60  # the Atari's frame rate: the video plays at the game's own speed


def evaluate(
    checkpoint,
    episodes: int = 30,
    video: Optional[Path] = None,
    greedy: bool = False,
    seed: int = 10_000,
    device: str = "auto",
) -> Dict[str, list]:
    """Play `episodes` whole games (all lives, unclipped score, the training protocol's no-op
    starts) with the checkpoint's policy; game i is seeded by SeedSequence([seed, i]).
    Writes the first game as an MP4 when `video` is given. Never writes to the run folder.
    Ctrl-C ends it early: the games finished by then are returned, with `stopped` True."""
    path, state = load_checkpoint(checkpoint)
    game_name = state["configs"]["game"]
    model = Model(state["n_actions"])
    model.load_state_dict(state["model"])
    model = model.to(select_device(device)).eval()
    seeds = [int(s) for s in np.random.SeedSequence([seed, 0]).generate_state(episodes)]
    generator = torch.Generator().manual_seed(seed)
    scores, lengths, stopped, written = [], [], False, None
    try:
        for i, game_seed in enumerate(seeds):
            game = Game(game_seed, game_name, clip_rewards=False)
            if i == 0 and video is not None:
                game.frames = []
            obs, info = game.reset(), None
            while info is None:
                with torch.no_grad():
                    pi, _ = model(torch.from_numpy(obs).unsqueeze(0).to(model.conv1.weight.device))
                probs = pi.probs.cpu()
                action = probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator)
                obs, _, _, info = game.step(int(action))
            if i == 0 and video is not None:
                write_video(video, game.frames)
                written, game.frames = str(video), None
            scores.append(info["reward"])
            lengths.append(info["length"])
            print(
                f"game {i + 1:3d}/{episodes}  seed {game_seed:10d}  score {info['reward']:7.1f}  "
                f"length {info['length']:6d}",
                flush=True,
            )
    except KeyboardInterrupt:
        stopped = True
    return {
        "scores": scores,
        "lengths": lengths,
        "seeds": seeds,
        "checkpoint": str(path),
        "video": written,
        "stopped": stopped,
    }


def write_video(path: Path, frames: List[np.ndarray]):
    """Write the MP4 beside `path` and rename it there, so a stopped write leaves no broken file."""
    import imageio.v2 as imageio

    partial = path.with_name(f".{path.stem}.partial.mp4")
    try:
        # macro_block_size=1 keeps the game's own 160x210 instead of padding it to a multiple of 16
        with imageio.get_writer(
            partial, fps=VIDEO_FPS, codec="libx264", macro_block_size=1, ffmpeg_log_level="error"
        ) as writer:
            for frame in frames:
                writer.append_data(frame)
        # imageio does not look at ffmpeg's exit status: a full disk would leave a cut video
        # behind a success, so count what the file holds
        import imageio_ffmpeg

        try:
            written = imageio_ffmpeg.count_frames_and_secs(str(partial))[0]
        except RuntimeError:
            written = 0
        if written != len(frames):
            cut = f"ffmpeg wrote {written} of {len(frames)} frames (is the disk full?)"
            raise RunFileError(f"cannot write {path}: {cut}")
        os.replace(partial, path)
    except OSError as e:
        raise RunFileError(f"cannot write {path}: {os_reason(e)}") from e
    finally:
        partial.unlink(missing_ok=True)


def read_metrics(folder: Path) -> List[dict]:
    path = Path(folder) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a crash mid-write: the others are still good
    if not records:
        raise RunFileError(f"no metrics in {folder} (expected a run folder with metrics.jsonl)")
    return records


PLOT_SIZE = (12, 9)  # inches; at PLOT_DPI, 1200x900 pixels
PLOT_DPI = 100
PLOT_PANELS = ["value_loss", "policy_reward", "entropy_bonus", "kl_div", "clip_fraction", "steps_per_second"]


def plot_runs(
    folders: List[Path],
    output: Path,
    baseline: Optional[float] = None,
    labels: Optional[List[str]] = None,
    max_steps: Optional[int] = None,
):
    """The game score (each game faint, the 100-game mean bold) against env steps, and the
    training statistics in small panels, one colour per run folder. `max_steps` cuts every run
    at that many env steps, so runs of different lengths compare over the same budget. Returns
    the (label, records) it drew, one per folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(folder), read_metrics(folder)) for folder in folders]
    if max_steps is not None:
        runs = [(folder, [r for r in records if r["env_steps"] <= max_steps]) for folder, records in runs]
    labels = labels or [folder.name[:12] for folder in folders]
    figure = plt.figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    grid = figure.add_gridspec(3, 3, height_ratios=[2, 1, 1])
    score_axes = figure.add_subplot(grid[0, :])
    panel_axes = [figure.add_subplot(grid[1 + i // 3, i % 3]) for i in range(len(PLOT_PANELS))]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    for (folder, records), label, colour in zip(runs, labels, colours):
        label = label if len(runs) > 1 else None
        game_steps = [r["env_steps"] for r in records for _ in r.get("games", [])]
        game_scores = [g[0] for r in records for g in r.get("games", [])]
        score_axes.scatter(game_steps, game_scores, s=6, alpha=0.3, color=colour, linewidths=0)
        with_mean = [r for r in records if "reward" in r]
        score_axes.plot(
            [r["env_steps"] for r in with_mean],
            [r["reward"] for r in with_mean],
            color=colour,
            linewidth=2,
            label=label,
        )
        for axes, key in zip(panel_axes, PLOT_PANELS):
            points = [(r["env_steps"], r[key]) for r in records if key in r]
            if points:
                axes.plot(*zip(*points), color=colour, linewidth=1)
    if baseline is not None:
        score_axes.axhline(baseline, color="grey", linestyle="--", label=f"random policy ({baseline:.1f})")
    score_axes.set_ylabel("game score (whole game, unclipped)")
    score_axes.set_title("faint: each game; bold: mean of the last 100 games")
    if len(runs) > 1 or baseline is not None:
        score_axes.legend(loc="upper left")
    for axes, key in zip(panel_axes, PLOT_PANELS):
        axes.set_title(key, fontsize=9)
        axes.tick_params(labelsize=7)
    for axes in [score_axes, *panel_axes[3:]]:
        axes.set_xlabel("env steps", fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=PLOT_DPI)
    plt.close(figure)
    return [(label, records) for label, (_, records) in zip(labels, runs)]


# ## Entry point
#
#     python ppo_breakout.py [flags]                 train (every Configs field is a flag)
#     python ppo_breakout.py --resume RUN_OR_FILE    go on from a checkpoint
#     python ppo_breakout.py evaluate CHECKPOINT [--episodes 30] [--video game.mp4] [--greedy]
#     python ppo_breakout.py plot RUN_FOLDER [RUN_FOLDER ...] [-o curve.png]
#     python ppo_breakout.py dashboard [--port 5005]   the labml dashboard, offline (dashboard.py)


def flag_of(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


def build_parser(add_help: bool = True, defaults: bool = True) -> argparse.ArgumentParser:
    """The training flags; with `defaults=False`, only the flags given appear in the result."""
    parser = argparse.ArgumentParser(
        prog="ppo_breakout.py",
        description="PPO on an Atari game (default Breakout), reported to labml. "
        "Subcommands: 'evaluate CHECKPOINT', 'plot RUN_FOLDER' and 'dashboard' (each with --help). "
        "Always on, no flag: frames stay uint8 until the model (the update's batch reordered to NHWC once, "
        "its minibatches gathered a sample at a time), fused Adam, and the Workers' shared-memory steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        add_help=add_help,
    )
    for field in dataclasses.fields(Configs):
        default = field.default if defaults else argparse.SUPPRESS
        if field.type in (bool, "bool"):
            parser.add_argument(
                flag_of(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=HELP[field.name],
            )
        else:
            kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            parser.add_argument(
                flag_of(field.name),
                dest=field.name,
                type=kind,
                default=default,
                metavar=field.name.rstrip("_").upper(),
                help=HELP[field.name],
            )
    parser.add_argument(
        "--dashboard",
        metavar="URL",
        default="auto" if defaults else argparse.SUPPRESS,
        help="labml dashboard to report to and take changes from: a URL, 'off', or 'auto' (the labml "
        f"config's web_api, else {DASHBOARD_URL} when something answers there)",
    )
    parser.add_argument(
        "--resume",
        metavar="PATH",
        default=None if defaults else argparse.SUPPRESS,
        help="continue from a checkpoint file, or the newest checkpoint of a run folder; "
        "flags given here override the checkpoint's configuration",
    )
    return parser


def configs_from(values: dict) -> Configs:
    """The Configs fields among `values` (parsed flags, a checkpoint's configuration), defaults elsewhere."""
    return Configs(**{k: v for k, v in values.items() if k in Configs.__dataclass_fields__})


def fail(prog: str, message: str) -> int:
    """One line on stderr naming the problem; the exit status for bad input."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


class StopRequested(Exception):
    """A second Ctrl-C, SIGTERM or SIGHUP: stop now, without waiting for the update to end."""


def stop_signals() -> List[int]:
    """The signals that stop a run: Ctrl-C, SIGTERM, and a terminal's hang-up unless the run was
    started under `nohup`, which ignores it."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return signals


def terminal_leaver() -> Callable[[], None]:
    """A function that points stdin, stdout and stderr, those of them that are the terminal now
    (after a hang-up `isatty` says no), at /dev/null: after a hang-up every write to the terminal
    fails (EIO), and the run still has its update and checkpoint to write."""
    fds = [fd for fd in (0, 1, 2) if os.isatty(fd)]

    def leave_terminal():
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in fds:
            os.dup2(devnull, fd)
        os.close(devnull)

    return leave_terminal


def install_stop_handlers(trainer: Trainer):
    """The first Ctrl-C, SIGTERM or hang-up (SIGHUP: the terminal closed, an ssh connection
    dropped) lets the update finish and ends the run with a checkpoint; a second one stops at
    once (the previous checkpoint stays). Under `nohup`, which ignores SIGHUP, a hang-up stays
    ignored."""
    if ctrl_c_pressed:  # a Ctrl-C during the start-up that Python dropped (see `remember_ctrl_c`)
        raise KeyboardInterrupt
    leave_terminal = terminal_leaver()

    def handler(signum, frame):
        if signum == signal.SIGHUP:
            leave_terminal()
        if trainer.stop_requested:
            raise StopRequested(signum)
        trainer.stop_requested = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this update with a checkpoint (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    for signum in stop_signals():
        signal.signal(signum, handler)


DASHBOARD_URL = "http://127.0.0.1:5005"  # where `python ppo_breakout.py dashboard` listens


def dashboard_answers(url: str, timeout: float = 1.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/v1/auth/is_logged", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def dashboard_flag_problem(flag: str) -> Optional[str]:
    """What is wrong with the --dashboard flag, or None: a mistyped URL must not quietly turn
    the dashboard off."""
    from urllib.parse import urlparse

    if flag in ("auto", "off"):
        return None
    url = urlparse(flag)
    try:
        url.port  # raises on a port that is not a number in 0-65535
        valid = url.scheme in ("http", "https") and bool(url.hostname)
    except ValueError:
        valid = False
    return None if valid else f"must be auto, off or an http(s) URL such as {DASHBOARD_URL}, got {flag!r}"


def choose_dashboard(flag: str) -> Tuple[Optional[str], Optional[str]]:
    """(dashboard URL or None, one line to print or None) for the --dashboard flag."""
    if flag == "off":
        return None, None
    if flag == "auto":
        from labml.internal.lab import lab_singleton

        configured = lab_singleton().web_api  # .labml.yaml's web_api, or the labml_server variable
        url = configured.url.split("/api/v1/")[0] if configured is not None else DASHBOARD_URL
    else:
        url = flag.rstrip("/")
    if dashboard_answers(url):
        return url, None
    return None, f"no labml dashboard answers at {url}: metrics go to the run folder only"


def connect_dashboard(url: str):
    """Point labml's web-API writer at the dashboard: it sends the metrics and brings back the
    hyperparameter changes made there (in the answer to each send, about 3 s later)."""
    from labml import lab

    lab.configure(
        {
            "web_api": f"{url}/api/v1/track?",
            "web_api_frequency": 0,  # send at every tracker.save
            "web_api_verify_connection": False,
            "web_api_open_browser": False,
        }
    )


def claim_run(url: str, run_uuid: str, timeout: float = 600.0):
    """Claim the run on the dashboard (its page ignores hyperparameter changes until then). The run
    appears there with labml's first send, so retry until it does. labml-app answers every claim of
    an existing run with success, even one it then undoes or ignores (see dashboard.py), so read the
    run back and stop only when it says claimed; otherwise say so. Runs in a daemon thread."""
    import threading
    import urllib.request

    def claimed() -> bool:
        urllib.request.urlopen(
            urllib.request.Request(f"{url}/api/v1/run/{run_uuid}/claim", method="PUT"), timeout=10
        ).close()
        with urllib.request.urlopen(f"{url}/api/v1/run/{run_uuid}", timeout=10) as response:
            return bool(json.loads(response.read()).get("is_claimed"))

    def claim():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if claimed():
                    return
            except (OSError, ValueError):
                pass  # not there yet, or the dashboard is busy
            time.sleep(1.0)
        logger.log(f"could not claim run {run_uuid} on {url}: claim it on its page to change hyperparameters")

    threading.Thread(target=claim, name="claim-run", daemon=True).start()


def run_path() -> Path:
    """The folder labml made for the current run."""
    from labml.internal.experiment import experiment_singleton

    return Path(experiment_singleton().run.run_path)


def left_behind(trainer: Optional[Trainer], c: Configs, resumed: bool) -> str:
    """What a run stopped at once has saved, said as it is."""
    kept = "; the checkpoint it resumed from stays" if resumed else ""
    if trainer is None or not (trainer.run_path / "metrics.jsonl").exists():
        return f"no update had finished, so nothing was saved{kept}"
    checkpoints = sorted((trainer.run_path / "checkpoints").glob("update_*.pt"))
    if not checkpoints:
        every = f"one every {c.checkpoint_every} updates"
        return f"no checkpoint yet ({every}); the metrics are in {trainer.run_path}{kept}"
    return f"the last checkpoint is {checkpoints[-1]}; the metrics are in {trainer.run_path}"


def train_main(argv: List[str]) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    configs = configs_from(args)
    checkpoint, comment = None, None
    if args["resume"]:
        explicit = vars(build_parser(defaults=False).parse_args(argv))
        try:
            path, checkpoint = load_checkpoint(args["resume"], game=explicit.get("game"))
        except CheckpointError as e:
            return fail(parser.prog, f"argument --resume: {e}")
        configs = configs_from({**checkpoint["configs"], **explicit})
        if configs.updates <= checkpoint["update"]:
            # --updates is the total, counted from the first run's start: nothing would be trained
            return fail(
                parser.prog,
                f"argument --updates: {configs.updates} is not beyond the checkpoint's update "
                f"{checkpoint['update']} ({path}); --updates counts all updates, so give more to train on",
            )
        comment = f"continues run {path.parent.parent.name} from update {checkpoint['update']} ({path})"
    errors = config_errors(configs)
    for name, problem in errors[:-1]:
        print(f"{parser.prog}: error: argument {flag_of(name)}: {problem}", file=sys.stderr)
    if errors:
        name, problem = errors[-1]
        parser.error(f"argument {flag_of(name)}: {problem}")

    problem = dashboard_flag_problem(args["dashboard"])
    if problem:
        parser.error(f"argument --dashboard: {problem}")
    dashboard, notice = choose_dashboard(args["dashboard"])
    if notice:
        print(notice)
    if dashboard:
        connect_dashboard(dashboard)
    writers = {"screen", "sqlite"} | ({"web_api"} if dashboard else set())
    experiment.create(name="ppo_breakout", comment=comment, writers=writers)
    trainer = None
    try:
        trainer = Trainer(configs, run_path=run_path(), checkpoint=checkpoint)
        hyperparams = {k: getattr(trainer, k) for k in DYNAMIC}
        experiment.configs({**dataclasses.asdict(configs), **hyperparams, "resumed_from": comment or ""})
        if comment:
            print(comment)
        install_stop_handlers(trainer)
        with experiment.start():
            if dashboard:
                uuid = experiment.get_uuid()
                print(f"dashboard: {dashboard}/run/{uuid}\nhyperparameters: {dashboard}/run/{uuid}/hyper_params")
                claim_run(dashboard, uuid)
            trainer.run_training_loop()
        if trainer.stop_requested:
            print(
                f"Stopped at update {trainer.update}; checkpoint and metrics are in {trainer.run_path}", file=sys.stderr
            )
            return 128 + trainer.stop_requested
    except (KeyboardInterrupt, StopRequested) as e:
        signum = e.args[0] if isinstance(e, StopRequested) else signal.SIGINT
        print(f"\nStopped at once; {left_behind(trainer, configs, resumed=checkpoint is not None)}", file=sys.stderr)
        return 128 + signum
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RunFileError, OSError) as e:  # a full disk, for one: what was written before stays
        reason = e if isinstance(e, RunFileError) else f"cannot write the run: {os_reason(e)}"
        print(f"error: {reason}; {left_behind(trainer, configs, resumed=checkpoint is not None)}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.destroy()
    return 0


def evaluate_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ppo_breakout.py evaluate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Play whole games with a checkpoint's policy and print the score statistics.",
    )
    parser.add_argument("checkpoint", help="a checkpoint file, or a run folder (its newest checkpoint)")
    parser.add_argument("--episodes", type=int, default=30, help="whole games to play")
    parser.add_argument("--video", type=Path, default=None, help="write the first game to this MP4 file")
    parser.add_argument("--greedy", action="store_true", help="take the most probable action instead of sampling")
    parser.add_argument("--seed", type=int, default=10_000, help="seeds the games and the action sampling")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.episodes <= 0:
        return fail(parser.prog, f"argument --episodes: must be a positive integer, got {args.episodes}")
    problem = seed_problem(args.seed)
    if problem:
        return fail(parser.prog, f"argument --seed: {problem}")
    if args.video is not None and args.video.suffix.lower() != ".mp4":
        return fail(parser.prog, f"argument --video: {args.video} must end in .mp4")
    if args.video is not None and not args.video.resolve().parent.is_dir():
        return fail(parser.prog, f"argument --video: folder {args.video.parent} does not exist")
    problem = device_problem(args.device)
    if problem:
        return fail(parser.prog, f"argument --device: {problem}")
    try:
        result = evaluate(args.checkpoint, args.episodes, args.video, args.greedy, args.seed, args.device)
    except CheckpointError as e:
        return fail(parser.prog, str(e))
    except RunFileError as e:  # the video could not be written
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    scores, lengths = np.array(result["scores"]), np.array(result["lengths"])
    print(f"checkpoint: {result['checkpoint']}")
    print(f"policy:     {'greedy' if args.greedy else 'sampled'}, seed {args.seed}")
    if len(scores):
        print(
            f"score:      mean {scores.mean():.2f}  std {scores.std():.2f}  min {scores.min():.1f}  "
            f"max {scores.max():.1f}  over {len(scores)} games"
        )
        print(f"length:     mean {lengths.mean():.1f}  min {lengths.min()}  max {lengths.max()} agent steps")
    if result["video"]:
        print(f"video:      {result['video']} (game 1, {VIDEO_FPS} fps)")
    if result["stopped"]:
        print(
            f"{parser.prog}: stopped by Ctrl-C after {len(scores)} of {args.episodes} games"
            + ("; no video was written" if args.video is not None and not result["video"] else ""),
            file=sys.stderr,
        )
        return 130
    return 0


def plot_main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ppo_breakout.py plot",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Draw the learning curve and training statistics of one or more runs.",
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="RUN_FOLDER", help="run folders to compare")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="PNG file to write (default: curve.png in the first run folder)"
    )
    parser.add_argument("--baseline", type=float, default=None, help="draw a random policy's mean score")
    parser.add_argument(
        "--label", action="append", default=None, help="legend name of a run, once per RUN_FOLDER in order"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="plot each run up to this many env steps")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            return fail(parser.prog, f"argument RUN_FOLDER: {folder} is not a folder")
    output = args.output or args.folders[0] / "curve.png"
    if not output.resolve().parent.is_dir():
        return fail(parser.prog, f"argument --output: folder {output.parent} does not exist")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if output.suffix.lower().lstrip(".") not in formats:
        # without a suffix matplotlib would write `output`.png, not the file we name
        return fail(
            parser.prog, f"argument --output: {output} must end in .png, .pdf, .svg or another of {sorted(formats)}"
        )
    if args.label is not None and len(args.label) != len(args.folders):
        return fail(parser.prog, f"argument --label: {len(args.label)} labels for {len(args.folders)} run folders")
    if args.max_steps is not None and args.max_steps <= 0:
        return fail(parser.prog, f"argument --max-steps: must be positive, got {args.max_steps}")
    try:
        plot_runs(args.folders, output, args.baseline, args.label, args.max_steps)
    except RunFileError as e:
        return fail(parser.prog, str(e))
    except OSError as e:
        print(f"{parser.prog}: error: cannot write {output}: {os_reason(e)}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


def dashboard_main(argv: List[str]) -> int:
    """The self-hosted labml dashboard lives in dashboard.py beside this file."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dashboard

    return dashboard.main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"evaluate": evaluate_main, "plot": plot_main, "dashboard": dashboard_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    try:
        signal.signal(signal.SIGINT, remember_ctrl_c)
        if ctrl_c_pressed:  # while the module was defining things
            raise KeyboardInterrupt
        sys.exit(main())
    except KeyboardInterrupt:  # before a command's own handling starts (each has its own after)
        print("\nStopped by Ctrl-C while starting; nothing was saved", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
