import json
import math
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from torch.distributions import Categorical

from game import Game
from ppo_breakout import ClippedPPOLoss, Coefficients, Model, Trainer, settings
from run_files import write_metrics
from speed import Backward, gather_rows, torch_threads


def test_one_update_end_to_end_on_the_cpu(tmp_path):
    with Trainer(*settings(updates=1, **TINY)) as trainer:
        trainer.run_training_loop(lambda stats, last: write_metrics(tmp_path, trainer, stats))
        assert trainer.update == 1 and trainer.env_steps == 32
        assert trainer.device.type == "cpu"
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    for key in (
        "policy_reward",
        "value_loss",
        "entropy_bonus",
        "kl_div",
        "clip_fraction",
        "explained_variance",
        "learning_rate",
        "steps_per_second",
    ):
        assert key in record and math.isfinite(record[key]), key
    assert record["env_steps"] == 32 and record["learning_rate"] == pytest.approx(1e-3)


def test_sample_shapes_and_dtypes():
    with Trainer(*settings(**TINY)) as trainer:
        samples = trainer.sample()
    assert samples["obs"].shape == (32, 4, 84, 84) and samples["obs"].dtype == torch.uint8
    for key in ("actions", "values", "log_pis", "advantages"):
        assert samples[key].shape == (32,), key
    assert samples["actions"].max() < 4


def test_same_seed_twice_gives_the_same_losses():
    results = []
    for _ in range(2):
        with Trainer(*settings(**TINY)) as trainer:
            results.append([trainer.train(trainer.sample()) for _ in range(2)])
    assert results[0] == results[1]
    with Trainer(*settings(**{**TINY, "seed": 6})) as trainer:
        other = [trainer.train(trainer.sample()) for _ in range(2)]
    assert other != results[0]


@pytest.mark.parametrize("rollout_threads,expected", [(1, 1), (0, 2)])
def test_the_rollout_uses_rollout_threads_and_training_one_torch_thread_in_each_of_its_threads(
    rollout_threads, expected
):
    torch.set_num_threads(2)
    seen = []
    with Trainer(*settings(rollout_threads=rollout_threads, train_threads=2, **TINY)) as trainer:
        forward = trainer.model.forward

        def recording(obs):
            seen.append((threading.get_ident(), torch.get_num_threads()))
            return forward(obs)

        trainer.model.forward = recording
        samples = trainer.sample()
        assert {threads for _, threads in seen} == {expected} and torch.get_num_threads() == 2
        assert {thread for thread, _ in seen} == {threading.get_ident()}
        seen.clear()
        trainer.train(samples)
        # each minibatch's two shares, in two threads of the training's own, one torch thread each
        assert len(seen) == 2 * TINY["batches"] and {threads for _, threads in seen} == {1}
        assert len({thread for thread, _ in seen}) == 2 and threading.get_ident() not in {t for t, _ in seen}
        assert torch.get_num_threads() == 2


def trained_weights(threads: int, **overrides) -> list:
    torch.set_num_threads(threads)
    try:
        with Trainer(*settings(**{**TINY, "epochs": 2, **overrides})) as trainer:
            for _ in range(2):
                trainer.train(trainer.sample())
            ran = trainer.backward.pool._max_workers
            return [p.detach().clone() for p in trainer.model.parameters()], ran
    finally:
        torch.set_num_threads(2)


def test_the_numbers_depend_on_train_threads_not_on_how_many_threads_ran_them():
    # torch's thread count is what a loaded machine or OMP_NUM_THREADS changes: one thread then
    # computes both shares in turn, and every weight comes out the same to the bit (on CPUs whose
    # kernels split their sums by thread, torch's own threads made them differ: docs/speed.md)
    one, ran_one = trained_weights(1, train_threads=2)
    two, ran_two = trained_weights(2, train_threads=2)
    assert (ran_one, ran_two) == (1, 2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_the_rest_of_a_cpu_step_runs_on_one_torch_thread_over_the_whole_minibatch(monkeypatch):
    torch.set_num_threads(2)
    normalised, clipped = [], []
    with Trainer(*settings(train_threads=2, **TINY)) as trainer:
        normalize, clip = trainer._normalize, torch.nn.utils.clip_grad_norm_

        def recording_normalize(adv):
            normalised.append((len(adv), threading.get_ident(), torch.get_num_threads()))
            return normalize(adv)

        def recording_clip(params, max_norm):
            clipped.append((threading.get_ident(), torch.get_num_threads()))
            return clip(params, max_norm=max_norm)

        trainer._normalize = recording_normalize
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
        trainer.train(trainer.sample())
    # once a minibatch, over all its 16 samples, before they are shared out: in this thread
    main = threading.get_ident()
    assert normalised == [(16, main, 1)] * TINY["batches"] and clipped == [(main, 1)] * TINY["batches"]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("shares", [2, 3])
def test_a_minibatch_in_shares_has_the_gradient_and_statistics_of_the_whole(shares):
    # 3 shares of a minibatch of 16: 5, 5 and 6 samples, weighted by their size. In fp32: under
    # bf16 autocast (--precision auto on a CPU with native bf16) a share's products are rounded to
    # bf16 apart from the whole's, which moves the gradient by more than the sum's own rounding
    with Trainer(*settings(precision="fp32", **TINY)) as trainer:
        samples = trainer.sample()
        rows = {k: v[:16] for k, v in samples.items()}
        rows["normalized_advantages"] = trainer._normalize(rows["advantages"])
        coefficients = Coefficients(learning_rate=1e-3, clip_range=0.1, value_loss_coef=0.5, entropy_bonus_coef=0.01)
        # the whole minibatch's loss, backpropagated at once
        loss, whole_stats = trainer._calc_loss(rows, coefficients)
        whole = torch.autograd.grad(loss, list(trainer.model.parameters()))
        backward = Backward(trainer.model.parameters(), trainer.device, shares, 16)
        trainer.model.zero_grad(set_to_none=True)
        split_stats = backward(lambda share: trainer._calc_loss(share, coefficients), rows)
        split = [p.grad for p in trainer.model.parameters()]
        backward.close()
    assert backward.shares == shares
    torch.testing.assert_close(split_stats, whole_stats, rtol=1e-5, atol=1e-6)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_train_threads_0_takes_torchs_thread_count_and_a_gpu_computes_one_share():
    torch.set_num_threads(2)
    with Trainer(*settings(**TINY)) as trainer:
        assert trainer.backward.shares == 2 and trainer.backward.pool._max_workers == 2
    model = Model(4)
    assert Backward(model.parameters(), torch.device("cuda"), 3, 16).shares == 1  # builds nothing on the GPU
    with pytest.raises(ValueError, match="train_threads: 17 shares of a minibatch of 16 samples"):
        Backward(model.parameters(), torch.device("cpu"), 17, 16)


def test_the_rollout_pairs_each_game_observation_with_its_action_and_outcome():
    # each worker's game is replayed here with its own seed and the actions the rollout recorded:
    # it must see the same frames, rewards and ends. 400 steps a worker: long enough for rewards,
    # lost lives, a game's end and the next game's first frames (a random game lasts ~200 steps)
    with Trainer(*settings(**dict(TINY, worker_steps=400))) as trainer:
        trainer.sample()
        n, t = trainer.n_workers, trainer.worker_steps
        seeds = np.random.SeedSequence(TINY["seed"]).generate_state(n)
        seen = {"reward": 0, "lost life": 0, "game over": 0, "step after a reset": 0}
        for w in range(n):
            game = Game(int(seeds[w]))
            obs, reset = game.reset(), False
            for step in range(t):
                assert np.array_equal(trainer.rollout_obs[w, step].numpy(), obs), (w, step)
                seen["step after a reset"] += reset
                obs, reward, done, info = game.step(int(trainer.actions[w, step]))
                assert (trainer.rewards[w, step], trainer.done[w, step]) == (reward, done), (w, step)
                seen["reward"] += reward != 0
                seen["lost life"] += done and info is None
                seen["game over"] += info is not None
                reset = info is not None
            assert np.array_equal(trainer.obs[w], obs)
        assert all(seen.values()), seen  # each kind of step was among those checked
        # and the policy's outputs were stored against the same steps: recomputed as the rollout
        # computed them, a step's n_workers frames at a time, in its threads and autocast (bf16 on
        # a CPU with AVX-512 bf16 or AMX, where fp32 on all the frames at once differs by 2e-4),
        # they are the same numbers
        with torch.no_grad(), trainer._autocast(), torch_threads(trainer.run_settings.rollout_threads):
            for step in range(t):
                pi, v = trainer.model(trainer.rollout_obs[:, step])
                log_pi = pi.log_prob(trainer.actions[:, step])
                torch.testing.assert_close(log_pi, trainer.log_pis[:, step], rtol=0, atol=1e-6)
                torch.testing.assert_close(v, trainer.values[:, step], rtol=0, atol=1e-6)


def test_a_changed_dynamic_hyperparameter_is_used_by_the_next_update():
    with Trainer(*settings(**TINY)) as trainer:
        trainer.epochs.set_value(1)
        trainer.train(trainer.sample())
        one_epoch = trainer.optimizer_steps
        assert one_epoch == 2  # 2 minibatches
        trainer.epochs.set_value(2)
        trainer.learning_rate.set_value(2e-4)
        trainer.train(trainer.sample())
        assert trainer.optimizer_steps - one_epoch == 2 * one_epoch
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_clip_range_is_read_at_every_minibatch(monkeypatch):
    with Trainer(*settings(**TINY)) as trainer:
        samples = trainer.sample()
        seen = []
        original = ClippedPPOLoss.forward

        def spy(self, log_pi, sampled_log_pi, advantage, clip):
            seen.append(clip)
            trainer.clip_range.set_value(0.25)  # changed mid-epoch, as the dashboard may
            return original(self, log_pi, sampled_log_pi, advantage, clip)

        monkeypatch.setattr(ClippedPPOLoss, "forward", spy)
        trainer.train(samples)
    # the two shares of the first minibatch read 0.1, both of the second the new value
    assert seen == [0.1, 0.1, 0.25, 0.25]


def test_the_policy_update_raises_the_probability_of_an_action_with_positive_advantage():
    with Trainer(*settings(**{**TINY, "entropy_bonus_coef": 0.0, "value_loss_coef": 0.0, "epochs": 4})) as trainer:
        samples = trainer.sample()
        # half the samples took action 2 and it paid off, the other half took 3 and it did not
        actions = torch.tensor([2, 3] * 16)
        with torch.no_grad():
            pi, _ = trainer.model(samples["obs"])
        samples["actions"] = actions
        samples["log_pis"] = pi.log_prob(actions)
        samples["advantages"] = torch.where(actions == 2, 1.0, -1.0)
        trainer.train(samples)
        with torch.no_grad():
            after, _ = trainer.model(samples["obs"])
    assert (after.probs[:, 2] - pi.probs[:, 2]).mean() > 0.01
    assert (after.probs[:, 3] - pi.probs[:, 3]).mean() < -0.01


def test_ppo_learns_a_tiny_contextual_bandit_in_a_few_seconds():
    # One-step episodes on a tiny "game": the screen is bright on its left or right half and only
    # the matching action (1 or 2 of 4) pays 1. Random play earns 0.25 a step; the real Model,
    # GAE, losses and Trainer.train at the default hyperparameters must learn the rule.
    n, t = 2, 32
    with Trainer(*settings(**{**TINY, "worker_steps": t, "batches": 1, "epochs": 4})) as trainer:
        rng = torch.Generator().manual_seed(0)
        mean_rewards = []
        for _ in range(12):
            side = torch.randint(0, 2, (n * t,), generator=rng)
            obs = torch.zeros((n * t, 4, 84, 84), dtype=torch.uint8)
            obs[side == 0, :, :, :42] = 255
            obs[side == 1, :, :, 42:] = 255
            with torch.no_grad():
                pi, value = trainer.model(obs)
                actions = pi.sample()
            rewards = (actions == side + 1).float()
            values = np.concatenate([value.reshape(n, t).numpy(), np.zeros((n, 1), np.float32)], axis=1)
            done = np.ones((n, t), dtype=bool)
            advantages = trainer.gae(done, rewards.reshape(n, t).numpy(), values)
            samples = {
                "obs": obs,
                "actions": actions,
                "values": value,
                "log_pis": pi.log_prob(actions),
                "advantages": torch.from_numpy(advantages).reshape(-1),
            }
            trainer.train(samples)
            mean_rewards.append(rewards.mean().item())
    assert mean_rewards[0] < 0.45, mean_rewards  # the untrained policy plays at random
    assert np.mean(mean_rewards[-3:]) > 0.85, mean_rewards


def test_bad_configuration_is_refused_before_any_worker_starts():
    with pytest.raises(ValueError, match="batches: 3 does not divide"):
        Trainer(*settings(**{**TINY, "batches": 3}))


def test_the_linear_schedule_anneals_the_dashboard_learning_rate_to_zero():
    with Trainer(*settings(**{**TINY, "updates": 4, "lr_schedule": "linear", "learning_rate": 2.5e-4})) as trainer:
        used = []
        trainer.run_training_loop(lambda stats, last: used.append(stats["learning_rate"]))
        # update u (0 to 3) trains at 2.5e-4 * (1 - u / 4)
        assert used == pytest.approx([2.5e-4, 1.875e-4, 1.25e-4, 0.625e-4])
        trainer.update = 1
        assert trainer.current_learning_rate() == pytest.approx(2.5e-4 * 0.75)
        trainer.learning_rate.set_value(1e-4)  # the dashboard's value is the one the schedule scales
        assert trainer.current_learning_rate() == pytest.approx(1e-4 * 0.75)
    with Trainer(*settings(**{**TINY, "lr_schedule": "constant"})) as constant:
        constant.update = 3
        assert constant.current_learning_rate() == pytest.approx(1e-3)


def test_orthogonal_initialisation_as_in_the_baselines():
    from ppo_breakout import Model

    model = Model(4, orthogonal_init=True)
    w = model.lin.weight  # [512, 3136]: orthogonal rows with gain sqrt(2)
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(512), atol=1e-4, rtol=0)
    assert model.pi_logits.weight.abs().max() < 0.02 and not model.lin.bias.any()
    default = Model(4)
    assert model.pi_logits.weight.abs().max() < default.pi_logits.weight.abs().max()


def test_the_model_scales_uint8_frames_to_0_1_in_either_memory_format():
    torch.manual_seed(0)
    model = Model(4)
    obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    kept = obs.clone()
    # the Nature CNN by hand, on frames scaled the plain way
    h = obs / 255.0
    for conv in (model.conv1, model.conv2, model.conv3):
        h = torch.relu(conv(h))
    h = torch.relu(model.lin(h.reshape(8, -1)))
    with torch.no_grad():
        pi, value = model(obs)
        assert torch.equal(pi.logits, Categorical(logits=model.pi_logits(h)).logits)
        assert torch.equal(value, model.value(h).reshape(-1))
        model = model.to(memory_format=torch.channels_last)
        pi_nhwc, value_nhwc = model(obs)
    assert torch.equal(obs, kept)  # the caller's frames are not scaled in place
    # the NHWC kernels add in another order: the same up to rounding
    torch.testing.assert_close(pi_nhwc.logits, pi.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value_nhwc, value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_update_gathers_its_minibatches_in_the_models_memory_format(channels_last):
    with Trainer(*settings(channels_last=channels_last, train_threads=2, **TINY)) as trainer:
        samples = trainer.sample()
        frames = trainer.rollout_obs.reshape(32, 4, 84, 84)
        gathered = []
        forward = trainer.model.forward
        trainer.model.forward = lambda obs: gathered.append(obs) or forward(obs)
        trainer.train(samples)
    assert torch.equal(samples["obs"], frames)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # 2 minibatches, each in the 2 shares of the default train_threads
    assert len(gathered) == 2 * 2 and all(obs.is_contiguous(memory_format=layout) for obs in gathered)


HEAP_AFTER_A_FREED_BLOCK = """
import ctypes, sys
sys.path.insert(0, sys.argv[2])
import speed


class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h)
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.malloc.argtypes = Mallinfo2, ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
reusing = speed.reuse_freed_memory() if sys.argv[1] == "on" else False
block = 24 << 20  # a minibatch's activations are tens of MB
mapped_before = libc.mallinfo2().hblkhd
pointer = libc.malloc(block)
mapped = libc.mallinfo2().hblkhd - mapped_before
libc.free(pointer)
print(reusing, mapped >= block, libc.mallinfo2().fordblks >= block)
"""


@pytest.mark.parametrize("setting", ["on", "off"])
def test_reused_freed_memory_keeps_a_freed_minibatch_sized_block_in_the_heap(setting):
    # What the setting does, read from glibc's own accounting in a fresh process: with glibc's
    # defaults a 24 MiB block is mapped for itself and unmapped when freed (so the next minibatch
    # faults its pages in anew); with reuse it comes from the heap and stays there, free, after
    # free(). The page faults this spares are bench.py's "faults:" figure.
    result = subprocess.run(
        [sys.executable, "-c", HEAP_AFTER_A_FREED_BLOCK, setting, str(ROOT)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reusing, mapped, kept = result.stdout.split()
    if setting == "on":
        assert (reusing, mapped, kept) == ("True", "False", "True")
    else:
        assert (mapped, kept) == ("True", "False")


def test_gather_rows_is_indexing_in_either_memory_format():
    frames = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8)
    indexes = torch.randperm(32)[:8]
    for batch in (frames, frames.contiguous(memory_format=torch.channels_last), torch.randn(32)):
        rows = gather_rows(batch, indexes)
        assert torch.equal(rows, batch[indexes])
        if batch.dim() == 4:
            nhwc = batch.is_contiguous(memory_format=torch.channels_last)
            assert rows.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def test_the_dashboard_cannot_make_the_learning_rate_zero_or_negative():
    with Trainer(*settings(**TINY)) as trainer:
        for value in (0.0, -1e-4):  # a learning rate of 0 trains nothing, a negative one climbs the loss
            trainer.learning_rate.set_value(value)
            assert trainer.learning_rate() == pytest.approx(1e-3), value
        # only the learning rate is positive-only: a loss weight may be switched off
        trainer.value_loss_coef.set_value(0.0)
        assert trainer.value_loss_coef() == 0.0


def test_an_update_that_makes_the_weights_not_finite_raises_diverged_before_it_is_kept():
    from ppo_breakout import Diverged

    kept = []
    with Trainer(*settings(**{**TINY, "updates": 3, "learning_rate": 1e10, "lr_schedule": "constant"})) as trainer:
        with pytest.raises(Diverged, match="update 1 diverged"):
            trainer.run_training_loop(lambda stats, last: kept.append(trainer.update))
        assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert kept == []  # the callback that writes metrics and checkpoints never saw it
