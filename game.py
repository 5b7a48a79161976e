"""
# The Atari protocol

What each of ppo_breakout.py's workers plays, and evaluate.py scores a policy on: one `Game` on
ale-py, which ships the ROMs itself, with the DQN preprocessing of
[Mnih et al. 2015](https://www.nature.com/articles/nature14236). It follows labml-nn 0.5.1's
`labml_nn/rl/game.py`, with whole-game scores. docs/protocol.md compares it with the published runs.
"""

import contextlib
import io
import os
from typing import Callable, List, Optional

import ale_py
import cv2
import numpy as np
from ale_py import roms

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


class RomError(ValueError):
    """The ROM of a game ale-py knows is missing or damaged where ale-py looks for it; one line."""


def rom_path(game: str) -> Optional[str]:
    """Path of the ROM that ale-py ships for `game`, or None for a game it does not know. Raises
    RomError, naming the game and where ale-py looked, when the file is missing or damaged there
    (ale-py's own folder, or ALE_ROMS_DIR where that is set)."""
    if game not in roms.get_all_rom_ids():
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # ale-py prints where it looks, in every worker
            return str(roms.get_rom_path(game))
    except OSError as e:
        where = os.environ.get("ALE_ROMS_DIR")
        looked = f"ALE_ROMS_DIR={where}" if where else os.path.dirname(roms.__file__)
        raise RomError(f"no usable ROM of {game} where ale-py looked ({looked}): {e}") from None


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
        self.ale.restoreState(ale_py.ALEState(np.asarray(state["emulator"], dtype=np.uint8).tobytes()))
        self.rng.bit_generator.state = state["noop_rng"]
        self.obs_4[:], self.screens[:] = state["obs_4"], state["screens"]
        self.score, self.length, self.lives = float(state["score"]), int(state["length"]), int(state["lives"])
