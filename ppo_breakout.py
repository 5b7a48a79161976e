"""
# PPO on Atari Breakout

Proximal Policy Optimization ([Schulman et al. 2017](https://arxiv.org/abs/1707.06347)) with
Generalized Advantage Estimation ([Schulman et al. 2015](https://arxiv.org/abs/1506.02438)) on an
Atari game of the Arcade Learning Environment, with the DQN preprocessing of
[Mnih et al. 2015](https://www.nature.com/articles/nature14236). The score reported is the mean of
the last 100 whole training games, as the PPO paper and CleanRL report theirs.

It follows labml.ai's annotated PPO experiment (labml-nn 0.5.1: `labml_nn/rl/ppo/experiment.py`,
`rl/ppo/gae.py`, `rl/ppo/__init__.py`), keeping its shape and names, on today's packages: ale-py
with its own ROMs, and labml 0.4.168's dynamic hyperparameters.

    python ppo_breakout.py                            # the default experiment: 10,000 updates
    python ppo_breakout.py --updates 3 --n-workers 2  # a quick smoke run; --help lists every setting
    python ppo_breakout.py --resume logs/ppo_breakout/<run>   # go on from its newest checkpoint
    python ppo_breakout.py evaluate logs/ppo_breakout/<run> --video game.mp4   # evaluate.py
    python ppo_breakout.py plot logs/ppo_breakout/<run> -o curve.png           # plots.py
    python ppo_breakout.py dashboard                  # the labml dashboard, offline (dashboard.py)
    torchrun --standalone --nproc_per_node=2 ppo_breakout.py  # one policy, 2 processes (distributed.py)

This file is the algorithm, in the order the data flows: the configuration, the Model, GAE, the
losses, the Trainer (sample -> train -> loss -> loop), and last the worker processes that play the
games. Below it stand game.py (the Atari protocol: what a worker plays) and speed.py (how fast it
runs); above it the tools, which import it: cli.py (the command line, and the run with labml),
run_files.py (metrics and checkpoints), evaluate.py, plots.py, dashboard.py and distributed.py.
"""

import contextlib
import ctypes
import dataclasses
import enum
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
from labml import logger, tracker
from labml.configs import FloatDynamicHyperParam, IntDynamicHyperParam
from torch import nn, optim
from torch.distributions import Categorical

import speed
from game import FRAME_STACK, OBS_SHAPE, Game, minimal_actions

# ## Configuration
#
# Each setting is declared once, with its default and its help, from which its flag is made. Two
# kinds: `Configs`, what the learning depends on, kept in every checkpoint and taken from it on
# resume; and `RunSettings`, what the machine does, taken from the command line every time.
# ⚙️ marks the dynamic ones, which the labml dashboard may change while a run goes on, within the
# range it offers (labml's experiment's; a value given outside it widens it).


def setting(default, help: str, dashboard: Optional[Tuple[float, float]] = None, positive: bool = False):
    # positive: the dashboard may not make it 0 or less (a learning rate of 0 trains nothing)
    return dataclasses.field(default=default, metadata={"help": help, "dashboard": dashboard, "positive": positive})


@dataclasses.dataclass
class Configs:
    """The algorithm's settings."""

    updates: int = setting(10_000, "number of updates (sample, then train)")
    # 4, not labml's 8: at 1M steps 4 scored higher on each of 3 seeds, kept the approximate KL
    # near 0.09 where 8 climbed to 0.5-0.7, and trains 1.5x faster (docs/labml.md)
    epochs: int = setting(4, "passes over each batch of samples (dynamic)", dashboard=(1, 32))  # ⚙️
    # 8 workers x 128 steps, as in the PPO paper's Atari runs
    n_workers: int = setting(8, "game worker processes")
    worker_steps: int = setting(128, "steps each worker takes per update")
    batches: int = setting(4, "minibatches per epoch; must divide n_workers * worker_steps")
    value_loss_coef: float = setting(0.5, "weight of the value-function loss (dynamic)", dashboard=(0.0, 1.0))  # ⚙️
    entropy_bonus_coef: float = setting(0.01, "weight of the entropy bonus (dynamic)", dashboard=(0.0, 0.1))  # ⚙️
    clip_range: float = setting(0.1, "PPO clip range epsilon, in (0, 1) (dynamic)", dashboard=(0.01, 0.5))  # ⚙️
    learning_rate: float = setting(  # ⚙️
        1e-3, "Adam learning rate (dynamic; the value --lr-schedule linear scales)", (0.0, 1e-3), positive=True
    )
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
    # 0 as the published Breakout runs (NoFrameskip-v4); 0.25 is Machado et al. 2018's protocol
    # and gymnasium v5's, which a policy trained without them plays badly (docs/results.md)
    sticky_actions: float = setting(0.0, "each frame, repeat the previous action with this probability, in [0, 1]")
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
    # the numbers depend on it (each share's sums), never on the load (speed.Backward)
    train_threads: int = setting(0, "on a CPU, each minibatch in this many shares, a thread each (0: torch's threads)")
    cuda_graphs: bool = setting(True, "on a CUDA GPU, replay each minibatch step and rollout forward as a CUDA graph")
    checkpoint_every: int = setting(50, "updates between checkpoints (and one at the end and at Ctrl-C/SIGTERM/SIGHUP)")
    keep_checkpoints: int = setting(3, "how many of the newest checkpoints to keep")
    # a worker that does not answer (stopped, deadlocked, swapped out) must not stall the run unseen
    worker_timeout: float = setting(60.0, "seconds a game worker may take to answer before the run ends (hung)")
    # under torchrun (distributed.py): how the ranks talk, and which GPU each local rank uses
    backend: str = setting("auto", "torchrun: auto (nccl where each rank has a GPU of its own, else gloo), gloo, nccl")
    device_ids: str = setting("", "torchrun: the GPU of each local rank, such as 0,0 for 2 ranks on GPU 0")


def settings_from(kind, values: dict):
    """`kind` (Configs or RunSettings) from those of `values` that are its fields (parsed flags, a
    checkpoint's configuration), its defaults for the rest."""
    return kind(**{k: v for k, v in values.items() if k in kind.__dataclass_fields__})


def settings(**values) -> Tuple[Configs, RunSettings]:
    """Both kinds of settings from keywords, such as `Trainer(*settings(n_workers=2, device="cpu"))`."""
    unknown = set(values) - set(Configs.__dataclass_fields__) - set(RunSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    return settings_from(Configs, values), settings_from(RunSettings, values)


def batches_problem(c: Configs) -> Optional[str]:
    """What is wrong with `batches`, if anything: it must divide the batch into equal minibatches."""
    batch_size = c.n_workers * c.worker_steps
    if c.batches > 0 and batch_size > 0 and batch_size % c.batches == 0:
        return None
    return f"{c.batches} does not divide the batch n_workers * worker_steps = {batch_size}"


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


def explained_variance(values: np.ndarray, returns: np.ndarray) -> float:
    """How much of the returns' variance V explains, for monitoring (1: all of it); NaN where the
    returns do not vary."""
    var_returns = returns.var()
    unexplained = (returns - values).var()
    return float(1 - unexplained / var_returns) if var_returns > 0 else float("nan")


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
# First what the Trainer leans on: the dashboard's values kept in range and read once a minibatch,
# the device a setting names, and the partner it exchanges with (nobody, when it trains alone);
# then the Trainer, whose methods follow the data: sample -> train -> loss -> loop.


class CheckedValue:
    """A dynamic hyperparameter that keeps the dashboard's value inside its range: a value out of
    range is clamped, one that is not a finite number refused, so neither can derail the run. Under
    torchrun every rank `held` rank 0's value for the update (distributed.Ranks.hold)."""

    held = None
    positive = False  # refuse 0 and less

    def __call__(self):
        value = super().__call__()  # labml's reports the value read: the dashboard's series
        return value if self.held is None else self.held

    def set_value(self, value):
        low, high = self._range_
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number) or (self.positive and number <= 0):
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


def dynamic_hyperparams(c: Configs) -> Dict[str, CheckedValue]:
    """⚙️ A labml dynamic hyperparameter for each setting with a dashboard range, by its name,
    starting at its value in `c` and offered in that range (widened to take the value)."""
    hyperparams, values = {}, dataclasses.asdict(c)
    for field in dataclasses.fields(Configs):
        if field.metadata["dashboard"] is not None:
            low, high = field.metadata["dashboard"]
            value, kind = values[field.name], CheckedInt if field.type is int else CheckedFloat
            hyperparams[field.name] = kind(value, (min(low, value), max(high, value)))
            hyperparams[field.name].positive = field.metadata["positive"]
    return hyperparams


@dataclasses.dataclass
class Coefficients:
    """The dynamic values one minibatch step uses, read once at its start: Adam takes the learning
    rate and the loss the rest. Floats, or zero-dimensional device tensors inside a CUDA graph,
    which copies them into the tensors it reads (a graph bakes in what it read at capture)."""

    learning_rate: float
    clip_range: float
    value_loss_coef: float
    entropy_bonus_coef: float


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

    def hold(self, hyperparams: Dict[str, CheckedValue]):
        """Under torchrun, rank 0's dynamic values, held by every rank for the update."""


# the statistics of each minibatch, in the order `_calc_loss` returns them
STATS = ("policy_reward", "value_loss", "entropy_bonus", "kl_div", "clip_fraction")


class Diverged(ArithmeticError):
    """An update made the losses or the weights infinite or NaN: nothing of it may be kept."""


def finite(model: nn.Module, stats: Dict[str, float]) -> bool:
    """Whether an update's mean losses and the weights after it are all finite (checked once an update)."""
    losses = torch.tensor([stats[name] for name in STATS])
    return bool(torch.isfinite(losses).all()) and all(bool(torch.isfinite(p).all()) for p in model.parameters())


class Trainer:
    """Samples from the workers with the current policy, computes advantages, and trains the model
    for `epochs` passes of `batches` minibatches over each batch. `partner` is torchrun's
    `distributed.Ranks`, or nobody. A run that goes on from a checkpoint starts at `first_update`
    (its new games are seeded by it), and run_files.restore puts the checkpoint's state in."""

    def __init__(self, configs: Configs, run_settings: RunSettings = RunSettings(), partner=None, first_update=0):
        if batches_problem(configs):  # cli.config_errors checks the rest before a run starts
            raise ValueError(f"batches: {batches_problem(configs)}")
        c, r = self.configs, self.run_settings = configs, run_settings
        self.partner = partner or OneProcess()
        self.updates, self.n_workers, self.worker_steps = c.updates, c.n_workers, c.worker_steps
        # total number of samples for a single update, and the size of a minibatch
        self.batch_size = self.n_workers * self.worker_steps
        self.mini_batch_size = self.batch_size // c.batches
        # ⚙️ read by calling them where they are used; by their settings' names for the dashboard
        h = self.hyperparams = dynamic_hyperparams(c)
        self.epochs, self.learning_rate, self.clip_range = h["epochs"], h["learning_rate"], h["clip_range"]
        self.value_loss_coef, self.entropy_bonus_coef = h["value_loss_coef"], h["entropy_bonus_coef"]

        self.device = parse_device(r.device)
        # the speed paths that apply here (speed.py): bf16 autocast, glibc's kept heap, CUDA graphs
        self.autocast_dtype, self.reusing_freed_memory, self.graphs = speed.paths(
            self.device, r.precision, r.reuse_freed_memory, r.cuda_graphs
        )
        torch.manual_seed(c.seed)
        self.model = Model(len(minimal_actions(c.game)), c.orthogonal_init).to(self.device)
        if r.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # fused: one kernel for the whole step; the same algorithm and saved moments
        self.optimizer = optim.Adam(self.model.parameters(), lr=c.learning_rate, eps=c.adam_eps, fused=True)
        self.gae = GAE(self.n_workers, self.worker_steps, c.gamma, c.lambda_)
        self.value_loss = ClippedValueFunctionLoss()
        # a minibatch's gradient step, its backward pass (in shares on a CPU), and the rollout's
        # forward pass, eager or as CUDA graphs
        self.backward = speed.Backward(self.model.parameters(), self.device, r.train_threads, self.mini_batch_size)
        if self.graphs:
            self.train_step = speed.GraphedTrainStep(self._train_step, self.optimizer, self.mini_batch_size)
        else:
            self.train_step = speed.TrainStep(self._train_step, self.optimizer, self.device)
        self.act = speed.Forward(self._act, self.device, self.graphs)

        # updates done so far, agent steps taken by all workers together, and Adam's steps
        self.update, self.env_steps, self.optimizer_steps = first_update, 0, 0
        # whole-game scores and lengths of the last 100 games, reported as their mean
        self.episode_rewards, self.episode_lengths = deque(maxlen=100), deque(maxlen=100)
        self.games: List[dict] = []  # the games that ended in the latest rollout
        self.explained_variance = float("nan")
        self.stop_requested = 0  # the number of the signal that asked the run to stop, if one did

        # the rollout buffers, allocated once; frames pinned on a CUDA machine for a fast copy
        n, t = self.n_workers, self.worker_steps
        self.obs = np.zeros((n, *OBS_SHAPE), dtype=np.uint8)  # the latest observation of each worker
        self.rollout_obs = torch.zeros((n, t, *OBS_SHAPE), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        self.rewards = np.zeros((n, t), dtype=np.float32)
        self.done = np.zeros((n, t), dtype=bool)
        self.actions = torch.zeros((n, t), dtype=torch.long)
        self.log_pis = torch.zeros((n, t), dtype=torch.float32, device=self.device)
        self.values = torch.zeros((n, t + 1), dtype=torch.float32, device=self.device)

        # each with a game begun; after a stop signal a worker gets only a few seconds to answer
        self.workers = start_workers(c, self.partner, first_update, r.worker_timeout, lambda: self.stop_requested)
        self.obs[:] = [worker.obs for worker in self.workers]

    def _autocast(self):
        return speed.autocast(self.device, self.autocast_dtype, self.graphs)

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
                    worker.send(Command.STEP, action)
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
        self.explained_variance = explained_variance(values[:, :-1], values[:, :-1] + advantages)

        samples = {"obs": self.rollout_obs, "actions": self.actions, "values": self.values[:, :-1]}
        samples.update(log_pis=self.log_pis, advantages=torch.from_numpy(advantages))
        # [n_workers, worker_steps, ...] -> [batch_size, ...] for training
        samples = {k: v.flatten(0, 1).to(self.device, non_blocking=True) for k, v in samples.items()}
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
        used: List[Coefficients] = []
        self.partner.hold(self.hyperparams)  # under torchrun, rank 0's values for the whole update
        epochs = self.epochs()  # read once per update: a change applies from the next update
        for _ in range(epochs):
            indexes = torch.randperm(self.batch_size, device=self.device)
            for start in range(0, self.batch_size, self.mini_batch_size):
                mini_batch_indexes = indexes[start : start + self.mini_batch_size]
                # read at every minibatch, so a change from the dashboard applies at once
                coefficients = Coefficients(
                    learning_rate=self.current_learning_rate(),
                    clip_range=self.clip_range(),
                    value_loss_coef=self.value_loss_coef(),
                    entropy_bonus_coef=self.entropy_bonus_coef(),
                )
                stats.append(self.train_step(samples, mini_batch_indexes, coefficients))
                used.append(coefficients)
                self.optimizer_steps += 1
        # under torchrun, the means over the whole job's minibatches
        means = self.partner.average(torch.stack(stats).double().mean(0))
        result = dict(zip(STATS, means.cpu().tolist()))
        clip_range, value_loss_coef, entropy_bonus_coef = np.mean(
            [(c.clip_range, c.value_loss_coef, c.entropy_bonus_coef) for c in used], axis=0
        ).tolist()
        result.update(clip_range=clip_range, value_loss_coef=value_loss_coef, entropy_bonus_coef=entropy_bonus_coef)
        result.update(learning_rate=coefficients.learning_rate, epochs=epochs)
        return result

    def _train_step(self, mini_batch: Dict[str, torch.Tensor], coefficients: Coefficients) -> torch.Tensor:
        """One gradient step on a minibatch; returns its statistics."""
        # normalised advantages, over the whole minibatch: a little bias for much lower variance
        mini_batch = {**mini_batch, "normalized_advantages": self._normalize(mini_batch["advantages"])}
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.backward(lambda rows: self._calc_loss(rows, coefficients), mini_batch)
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

    def _calc_loss(self, samples: Dict[str, torch.Tensor], c: Coefficients):
        """The total loss of a minibatch (or of a share of it), and the statistics to track (in the
        order of `STATS`)."""
        # R_t, the returns sampled from pi_OLD
        sampled_return = samples["values"] + samples["advantages"]
        with self._autocast():
            pi, value = self.model(samples["obs"])
        log_pi = pi.log_prob(samples["actions"])
        # a loss module for each call: it keeps its clip fraction, and a CPU's shares compute at once
        ppo_loss = ClippedPPOLoss()
        policy_loss = ppo_loss(log_pi, samples["log_pis"], samples["normalized_advantages"], c.clip_range)
        entropy_bonus = pi.entropy().mean()
        value_loss = self.value_loss(value, samples["values"], sampled_return, c.clip_range)
        # L^{CLIP+VF+EB} = L^{CLIP} + c_1 L^{VF} - c_2 L^{EB}
        loss = policy_loss + c.value_loss_coef * value_loss - c.entropy_bonus_coef * entropy_bonus
        # an estimate of KL(pi_OLD || pi) for monitoring (Schulman's "approximating KL" note)
        approx_kl_divergence = 0.5 * ((samples["log_pis"] - log_pi) ** 2).mean()
        stats = [-policy_loss, value_loss, entropy_bonus, approx_kl_divergence, ppo_loss.clip_fraction]
        return loss, torch.stack(stats).detach()

    def run_training_loop(self, after_update: Optional[Callable[[Dict[str, float], bool], None]] = None):
        """Sample, train, report, repeat; `after_update(stats, last)` keeps the run's files, `last`
        when the loop stops after it."""
        for update in range(self.update, self.updates):
            start, env_steps = time.perf_counter(), self.env_steps
            samples = self.sample()
            stats = self.train(samples)
            self.update = update + 1
            if self.partner.largest(not finite(self.model, stats)):  # under torchrun, any rank's
                raise Diverged(f"update {self.update} diverged: its losses or the weights are not finite numbers")
            # under torchrun every rank stops where any was asked to; a later signal stops the next update
            self.stop_requested = self.partner.largest(self.stop_requested)
            stopping = bool(self.stop_requested)
            stats["explained_variance"] = self.explained_variance
            stats["steps_per_second"] = (self.env_steps - env_steps) / (time.perf_counter() - start)
            if self.episode_rewards:
                stats["reward"] = float(np.mean(self.episode_rewards))
                stats["length"] = float(np.mean(self.episode_lengths))
            tracker.set_global_step(self.env_steps)
            tracker.save(stats)
            if after_update is not None:
                after_update(stats, stopping or self.update == self.updates)
            if stopping:
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    def destroy(self):
        """Stop and join every worker process, and the training's threads."""
        self.backward.close()
        for worker in self.workers:
            worker.request_close()
        for worker in self.workers:
            worker.close()
        self.workers = []


# ## Worker processes
#
# Each Game runs in its own process. Commands go through shared memory: the trainer writes the
# command (and a step's action) into the worker's slots and releases its `go` semaphore; the
# worker carries it out, writes the frame stack, reward, `done` and the game's score in place, and
# releases `ready`. A step, sent thousands of times a second, pickles nothing. Only a game's saved
# state (SET_STATE's, GET_STATE's reply) and a worker's error report travel over a Pipe.


class Command(enum.IntEnum):
    """What a worker does when its `go` semaphore is released."""

    STEP = 0  # step the game with `Slots.action`
    RESET = 1  # start a new game
    GET_STATE = 2  # send `Game.get_state()` over the pipe
    SET_STATE = 3  # go on from the state that follows over the pipe
    CLOSE = 4  # end the process


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
STOPPING_TIMEOUT_S = 5.0  # how long a worker may take to answer once the run was asked to stop


class WorkerError(RuntimeError):
    """A worker process died or raised."""


def die_with_parent(signum: int):
    """Have Linux send `signum` to this process when its parent dies (prctl PR_SET_PDEATHSIG);
    elsewhere nothing."""
    pr_set_pdeathsig = 1  # from linux/prctl.h
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signum)


def worker_process(
    remote, go, ready, slots: Slots, obs_buffer, parent_pid: int, seed: int, game: str, clip_rewards, sticky_actions
):
    # Ctrl-C, a hang-up and torchrun's SIGTERM go to the whole process group: the trainer handles them
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(0)
    obs = np.frombuffer(obs_buffer, dtype=np.uint8).reshape(OBS_SHAPE)
    try:
        env = Game(seed, game, clip_rewards, sticky_actions)
        while True:
            while not go.acquire(timeout=LIVENESS_CHECK_S):
                if os.getppid() != parent_pid:
                    return  # the trainer is gone (where there is no prctl)
            command = Command(slots.command)
            if command == Command.STEP:
                obs[:], slots.reward, slots.done, info = env.step(slots.action)
                if info is not None:
                    slots.score, slots.length = info["reward"], info["length"]
                slots.game_over = info is not None
            elif command == Command.RESET:
                obs[:] = env.reset()
            elif command == Command.GET_STATE:
                remote.send(env.get_state())
            elif command == Command.SET_STATE:
                env.set_state(remote.recv())
                obs[:] = env.obs_4
            elif command == Command.CLOSE:
                return
            ready.release()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the trainer is gone
    except BaseException as e:
        with contextlib.suppress(OSError):
            remote.send(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")  # the one str it sends
            slots.failed = True
            ready.release()
        raise SystemExit(1)
    finally:
        remote.close()


class Worker:
    """A Game in a process of its own. `send(command, data)` and `receive()` are split so a trainer
    can command all workers at once: `send(Command.STEP, action)`, then `receive() -> (reward, done,
    info)` with the new frame stack in `obs`; `send(Command.RESET)`, then `receive() -> None`;
    `send(Command.GET_STATE)`, then `receive() -> Game.get_state()`; `send(Command.SET_STATE,
    state)`, then `receive() -> None` with the game's frame stack in `obs`. `receive()` raises
    `WorkerError` naming the worker when it raised, within LIVENESS_CHECK_S when it died, and when
    it has not answered in `timeout` seconds (STOPPING_TIMEOUT_S once `stopping()` says a stop was
    asked for: a stop must not wait a minute for a hung worker)."""

    def __init__(
        self,
        seed: int,
        game: str = "breakout",
        clip_rewards: bool = True,
        index: int = 0,
        timeout: float = 60.0,
        stopping: Callable[[], int] = lambda: 0,
        sticky_actions: float = 0.0,
    ):
        self.timeout, self.stopping, self.hung = timeout, stopping, False
        # fork starts the workers in milliseconds, and is safe: they never touch torch
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.index = index
        obs_buffer = ctx.RawArray("B", int(np.prod(OBS_SHAPE)))
        self.obs = np.frombuffer(obs_buffer, dtype=np.uint8).reshape(OBS_SHAPE)
        self.slots = ctx.RawValue(Slots)
        self.go, self.ready = ctx.Semaphore(0), ctx.Semaphore(0)
        self.child, parent = ctx.Pipe()
        args = (parent, self.go, self.ready, self.slots, obs_buffer, os.getpid(), seed, game, clip_rewards)
        args += (sticky_actions,)
        self.process = ctx.Process(target=worker_process, name=f"ppo-worker-{index}", daemon=True, args=args)
        self.process.start()
        parent.close()
        self.closing = False

    def send(self, command: Command, data=None):
        if command == Command.STEP:
            self.slots.action = data
        elif command == Command.SET_STATE:
            try:
                self.child.send(data)
            except OSError:
                self._raise_dead()
        self.slots.command = command
        self.go.release()

    def receive(self):
        start = time.monotonic()
        while not self.ready.acquire(timeout=LIVENESS_CHECK_S):
            if not self.process.is_alive():
                self._raise_dead()
            limit = min(self.timeout, STOPPING_TIMEOUT_S) if self.stopping() else self.timeout
            if time.monotonic() - start > limit:
                why = "after the stop signal" if self.stopping() else "(--worker-timeout)"
                who = f"worker {self.index} (pid {self.process.pid})"
                self.hung = True  # it will not answer CLOSE either
                raise WorkerError(f"{who} has not answered in {limit:g} s {why}: hung")
        if self.slots.failed:
            self._raise_dead()
        if self.slots.command == Command.GET_STATE:
            return self.child.recv()
        if self.slots.command != Command.STEP:
            return None
        info = None
        if self.slots.game_over:
            info = {"reward": self.slots.score, "length": self.slots.length}
        return self.slots.reward, self.slots.done, info

    def _raise_dead(self):
        # a worker that raised sent its error before it exited: that is the cause to report
        with contextlib.suppress(EOFError, OSError):
            while self.child.poll():
                reply = self.child.recv()
                if isinstance(reply, str):
                    raise WorkerError(f"worker {self.index} raised {reply}")
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        cause = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        raise WorkerError(f"worker {self.index} (pid {self.process.pid}) died: {cause}")

    def request_close(self):
        """Ask the worker to stop, without waiting: the trainer asks all of them, then joins each."""
        if not self.closing and self.process.is_alive():
            self.closing = True
            self.slots.command = Command.CLOSE
            self.go.release()

    def close(self, timeout: float = 5.0):
        """Ask the worker to stop and join it; kill it if it does not stop in time, or at once if
        it hung (a worker ignores SIGTERM: the trainer handles the process group's signals)."""
        self.request_close()
        self.process.join(0 if self.hung else timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.child.close()


def start_workers(
    c: Configs, partner, first_update: int = 0, timeout: float = 60.0, stopping: Callable[[], int] = lambda: 0
) -> List[Worker]:
    """This process's `n_workers` workers, each with a game begun. Their seeds come from one SeedSequence, so runs with
    nearby seeds share no game; a run that goes on from a checkpoint whose games do not fit starts
    new games seeded by its update. Under torchrun the job's seeds are split among the ranks."""
    entropy = c.seed if first_update == 0 else [c.seed, first_update]
    n, rank = c.n_workers, partner.rank
    seeds = np.random.SeedSequence(entropy).generate_state(n * partner.world_size)[rank * n : (rank + 1) * n]
    workers: List[Worker] = []
    try:
        for i, seed in enumerate(seeds):
            workers.append(Worker(int(seed), c.game, c.clip_rewards, i, timeout, stopping, c.sticky_actions))
        for worker in workers:
            worker.send(Command.RESET)
        for worker in workers:
            worker.receive()
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return workers


if __name__ == "__main__":
    # The command line is the tools' (they import this file, so it names them only here): a
    # torchrun rank goes to distributed.py, everything else (training, the subcommands) to cli.py.
    import cli  # the tools above this file, named in its __main__ block alone
    import distributed  # (the __main__ block's too)

    argv = sys.argv[1:]
    torchrun_rank = "TORCHELASTIC_RUN_ID" in os.environ and not cli.subcommand(argv)
    sys.exit(distributed.main(argv) if torchrun_rank else cli.main(argv))
