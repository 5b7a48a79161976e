import numpy as np
import pytest

from ppo_breakout import OBS_SHAPE, Game, minimal_actions


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
    for _ in range(50):
        obs, _, done, _ = game.step(np.random.randint(4))
        if not done:
            np.testing.assert_array_equal(obs[:3], previous[1:])
        previous = obs.copy()
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
    while lives_lost < 2:
        obs, _, done, info = game.step(int(rng.integers(4)))
        if done and info is None:  # a life lost, the game goes on
            lives_lost += 1
            for k in range(3):
                np.testing.assert_array_equal(obs[k], obs[-1], err_msg=f"frame {k} carried over from the lost life")
            assert not np.array_equal(obs[-1], previous[-1]), "the new life's frame is a new screen"
        elif not done:
            np.testing.assert_array_equal(obs[:3], previous[1:])
        previous = obs.copy()


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
