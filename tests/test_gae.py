import numpy as np
import pytest
from labml_nn.rl.ppo.gae import GAE as ReferenceGAE

from ppo_breakout import GAE


@pytest.mark.parametrize("gamma,lambda_", [(0.99, 0.95), (0.9, 0.0), (1.0, 1.0), (0.5, 0.7)])
def test_gae_equals_labml_nn_on_random_data_with_random_dones(gamma, lambda_):
    rng = np.random.default_rng(0)
    n_workers, worker_steps = 5, 33
    done = rng.random((n_workers, worker_steps)) < 0.1
    rewards = rng.normal(size=(n_workers, worker_steps)).astype(np.float32)
    values = rng.normal(size=(n_workers, worker_steps + 1)).astype(np.float32)
    ours = GAE(n_workers, worker_steps, gamma, lambda_)(done, rewards, values)
    reference = ReferenceGAE(n_workers, worker_steps, gamma, lambda_)(done, rewards, values)
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)


def test_gae_small_case_worked_by_hand():
    # gamma = lambda = 0.5; the episode ends with step 1, so step 2 starts a new one.
    # t=2: delta = 2 + 0.5 * V(s_3)=2 - V(s_2)=0 = 3            A_2 = 3
    # t=1: done, so V(s_2) and A_2 are cut: delta = 0 - 1 = -1   A_1 = -1
    # t=0: delta = 1 + 0.5 * 1 - 0.5 = 1                         A_0 = 1 + 0.25 * -1 = 0.75
    done = np.array([[False, True, False]])
    rewards = np.array([[1.0, 0.0, 2.0]], dtype=np.float32)
    values = np.array([[0.5, 1.0, 0.0, 2.0]], dtype=np.float32)
    advantages = GAE(1, 3, 0.5, 0.5)(done, rewards, values)
    np.testing.assert_allclose(advantages, [[0.75, -1.0, 3.0]])


def test_done_at_step_t_cuts_the_bootstrap_from_the_next_state():
    # the convention written next to GAE: done[:, t] means s_{t+1} belongs to a new episode
    rewards = np.zeros((1, 2), dtype=np.float32)
    values = np.array([[0.0, 0.0, 100.0]], dtype=np.float32)
    running = GAE(1, 2, 0.9, 1.0)(np.array([[False, False]]), rewards, values)
    ended = GAE(1, 2, 0.9, 1.0)(np.array([[False, True]]), rewards, values)
    assert running[0, 1] == pytest.approx(90.0)
    assert ended[0, 1] == 0.0 and ended[0, 0] == 0.0
