import ale_py
import cv2
import numpy as np
import pytest

import game
import ppo_breakout
from game import FRAME_SIZE, FRAME_SKIP, FRAME_STACK, NOOP_MAX, OBS_SHAPE, Game, minimal_actions, rom_path


def test_breakout_has_its_four_minimal_actions():
    assert len(minimal_actions("breakout")) == 4


def test_reset_and_step_give_uint8_frame_stacks():
    game = Game(seed=0)
    obs = game.reset()
    assert obs.shape == OBS_SHAPE == (4, 84, 84) and obs.dtype == np.uint8
    obs, reward, done, info = game.step(1)
    assert obs.shape == OBS_SHAPE and obs.dtype == np.uint8
    assert isinstance(reward, float) and isinstance(done, bool) and info is None


def test_frame_stack_shifts_by_one_frame_each_step():
    game = Game(seed=1)
    previous = game.reset().copy()
    rng = np.random.default_rng(1)
    shifted = 0
    for _ in range(50):
        obs, _, done, _ = game.step(int(rng.integers(4)))
        if not done:
            np.testing.assert_array_equal(obs[:3], previous[1:])
            shifted += 1
        previous = obs.copy()
    assert shifted >= 40, "most of 50 steps go on without a lost life"
    assert previous[-1].any(), "the newest frame should show the game"


def _play_one_game(game, rng):
    """Play random actions until `info` arrives; returns the steps as (reward, done, info, lives)."""
    steps = []
    while True:
        _, reward, done, info = game.step(int(rng.integers(4)))
        steps.append((reward, done, info, game.ale.lives()))
        if info is not None:
            return steps
        assert len(steps) < 27_000, "a game is capped at 108,000 frames"


def test_a_lost_life_is_done_while_the_game_goes_on_and_info_comes_once_per_game():
    game = Game(seed=2, clip_rewards=False)
    game.reset()
    lives = game.ale.lives()
    assert lives == 5
    steps = _play_one_game(game, np.random.default_rng(0))
    dones = [i for i, (_, done, _, _) in enumerate(steps) if done]
    infos = [i for i, (_, _, info, _) in enumerate(steps) if info is not None]
    # one done per life; the game goes on through the first four, with one life fewer each time
    assert len(dones) == lives
    assert infos == [dones[-1]] == [len(steps) - 1]
    for k, i in enumerate(dones[:-1]):
        assert steps[i][3] == lives - 1 - k
    # the info score is the whole game's unclipped score, and its length the steps taken
    info = steps[-1][2]
    assert info["reward"] == pytest.approx(sum(r for r, _, _, _ in steps))
    assert info["length"] == len(steps)
    # after the game, it resets by itself: all lives back
    assert game.ale.lives() == lives


def test_a_lost_life_starts_a_fresh_frame_stack_of_the_new_frame():
    game = Game(seed=3)
    previous = game.reset().copy()
    rng = np.random.default_rng(4)
    lives_lost = 0
    for _ in range(2_000):
        obs, _, done, info = game.step(int(rng.integers(4)))
        if done and info is None:  # a life lost, the game goes on
            lives_lost += 1
            for k in range(3):
                np.testing.assert_array_equal(obs[k], obs[-1], err_msg=f"frame {k} carried over from the lost life")
            assert not np.array_equal(obs[-1], previous[-1]), "the new life's frame is a new screen"
        previous = obs.copy()
        if lives_lost == 2:
            break
    assert lives_lost == 2


def test_training_reward_is_the_sign_of_the_game_reward():
    clipped, raw = Game(seed=4), Game(seed=4, clip_rewards=False)
    clipped.reset(), raw.reset()
    rng = np.random.default_rng(3)
    raw_rewards, clipped_rewards = [], []
    for _ in range(600):
        action = int(rng.integers(4))
        clipped_rewards.append(clipped.step(action)[1])
        raw_rewards.append(raw.step(action)[1])
    assert any(raw_rewards), "random play should hit some bricks in 600 steps"
    np.testing.assert_array_equal(clipped_rewards, np.sign(raw_rewards))


def test_same_seed_same_game():
    a, b = Game(seed=7), Game(seed=7)
    np.testing.assert_array_equal(a.reset(), b.reset())
    for action in [1, 2, 3, 0] * 20:
        oa, ra, da, _ = a.step(action)
        ob, rb, db, _ = b.step(action)
        np.testing.assert_array_equal(oa, ob)
        assert (ra, da) == (rb, db)


def test_other_games_ale_py_ships_work_too():
    game = Game(seed=0, game="pong")
    assert game.reset().shape == OBS_SHAPE
    assert len(game.actions) == 6


# ## The protocol: what published Breakout results assume of the game


def _raw_breakout(seed: int) -> ale_py.ALEInterface:
    """A bare ALEInterface set up as Game says it sets up its own: no sticky actions, same seed."""
    ale = ale_py.ALEInterface()
    ale.setInt("random_seed", seed)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.setInt("max_num_frames_per_episode", 108_000)
    ale.loadROM(rom_path("breakout"))
    return ale


def test_a_step_shows_the_max_of_its_last_two_frames():
    game = Game(seed=11)
    game.reset()
    # replay the same game in a second emulator: the no-ops reset() took, then FIRE for one step
    noops = game.ale.getEpisodeFrameNumber() - FRAME_SKIP
    raw = _raw_breakout(11)
    raw.reset_game()
    for action in [ale_py.Action.NOOP] * noops + [ale_py.Action.FIRE] * FRAME_SKIP:
        raw.act(action)
    np.testing.assert_array_equal(raw.getScreenGrayscale(), game.ale.getScreenGrayscale())
    rng = np.random.default_rng(11)
    max_is_not_last = 0
    for t in range(20):
        action = int(rng.integers(4))
        obs, _, done, _ = game.step(action)
        assert not done, f"step {t}: no life is lost in the first 20 steps of this game"
        frames = []
        for _ in range(FRAME_SKIP):
            raw.act(game.actions[action])
            frames.append(raw.getScreenGrayscale())
        third, fourth = frames[-2:]
        assert not np.array_equal(third, fourth), f"step {t}: the ball moves between the two frames"
        expected = cv2.resize(np.maximum(third, fourth), (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(obs[-1], expected, err_msg=f"step {t}")
        last_only = cv2.resize(fourth, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)
        max_is_not_last += not np.array_equal(expected, last_only)
    # so the check above would fail on a frame stack of the last frame alone
    assert max_is_not_last >= 15


def test_a_game_starts_from_the_max_of_its_fire_steps_last_two_frames():
    game = Game(seed=15)
    obs = game.reset()
    noops = game.ale.getEpisodeFrameNumber() - FRAME_SKIP
    raw = _raw_breakout(15)
    raw.reset_game()
    for _ in range(noops):
        raw.act(ale_py.Action.NOOP)
    frames = []
    for _ in range(FRAME_SKIP):
        raw.act(ale_py.Action.FIRE)
        frames.append(raw.getScreenGrayscale())
    third, fourth = frames[-2:]
    assert not np.array_equal(third, fourth), "the two frames differ, so the max is not the last alone"
    expected = cv2.resize(np.maximum(third, fourth), (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)
    last_only = cv2.resize(fourth, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)
    assert not np.array_equal(expected, last_only)
    for k in range(FRAME_STACK):
        np.testing.assert_array_equal(obs[k], expected, err_msg=f"frame {k}")


def test_fire_relaunches_the_ball_after_a_lost_life():
    # Breakout waits for FIRE after every lost life: with no-ops alone the ball never comes
    raw = _raw_breakout(12)
    raw.reset_game()
    for _ in range(2_000):
        raw.act(ale_py.Action.NOOP)
    assert raw.lives() == 5 and not raw.game_over()
    # the Game presses it: an agent that only ever plays NOOP still loses all five lives, one
    # after another, and the game ends within a few hundred steps, far short of the frame cap
    game = Game(seed=12)
    game.reset()
    lives_lost, lives = 0, [game.ale.lives()]
    for t in range(1_000):
        _, _, done, info = game.step(0)
        if info is not None:
            break
        if done:
            lives_lost += 1
            lives.append(game.ale.lives())
    assert info is not None, "the game ended"
    assert lives_lost == 4 and lives == [5, 4, 3, 2, 1]
    assert info["length"] == t + 1 < 1_000


def test_no_op_starts_vary_from_one_game_to_the_next():
    # each game starts after 1 to NOOP_MAX no-op frames, then FIRE for one step
    def start_frames(game):
        game.reset()
        return game.ale.getEpisodeFrameNumber()

    seeded = [start_frames(Game(seed=seed)) for seed in range(10)]
    game = Game(seed=13)
    one_after_another = [start_frames(game) for _ in range(10)]
    for frames in (seeded, one_after_another):
        assert all(1 + FRAME_SKIP <= f <= NOOP_MAX + FRAME_SKIP for f in frames), frames
        assert len(set(frames)) >= 5, frames


def test_the_frame_cap_ends_a_game_that_still_has_lives(monkeypatch):
    assert Game(seed=0).ale.getInt("max_num_frames_per_episode") == 108_000
    cap = 400  # NOOP play loses a life about every 100 frames: 2 of 5 are left at the cap
    uncapped = Game(seed=14, clip_rewards=False)
    monkeypatch.setattr(game, "MAX_FRAMES", cap)  # Game reads it when it is made
    capped = Game(seed=14, clip_rewards=False)
    assert capped.ale.getInt("max_num_frames_per_episode") == cap
    capped.reset(), uncapped.reset()
    start = capped.ale.getEpisodeFrameNumber()
    score, lives_lost = 0.0, 0
    for t in range(cap):
        lives = capped.ale.lives()
        _, reward, done, info = capped.step(0)
        _, _, _, uncapped_info = uncapped.step(0)
        score += reward
        if info is not None:
            break
        lives_lost += done
    assert info is not None and done
    assert lives_lost == 3 and lives == 2, "the game ended with lives left"
    assert uncapped_info is None, "the same game without the cap goes on"
    # its length: the steps of FRAME_SKIP frames, and a FIRE step's frames at each lost life, from
    # the game's start until the frames run out, the last step cut short
    assert info == {"reward": score, "length": t + 1}
    assert info["length"] == -(-(cap - start - FRAME_SKIP * lives_lost) // FRAME_SKIP)


def test_the_sticky_actions_of_the_configuration_reach_a_workers_emulator():
    # with probability 1 every frame repeats the action before it, NOOP from the reset on: RIGHT
    # never moves the paddle, where without sticky actions it does at once
    frames = {}
    for sticky in (0.0, 1.0):
        worker = ppo_breakout.Worker(seed=3, sticky_actions=sticky)
        try:
            worker.send(ppo_breakout.Command.RESET)
            worker.receive()
            first = worker.obs.copy()
            for _ in range(10):
                worker.send(ppo_breakout.Command.STEP, 2)  # RIGHT in Breakout's minimal action set
                worker.receive()
            frames[sticky] = (first, worker.obs.copy())
        finally:
            worker.close()
    moved = {sticky: not np.array_equal(before[-1], after[-1]) for sticky, (before, after) in frames.items()}
    assert moved == {0.0: True, 1.0: False}, moved
