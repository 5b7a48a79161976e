"""CUDA graphs (`--cuda-graphs`, on by default on a GPU) compute what the eager code does.

They need a CUDA GPU, so they are skipped where there is none (CI); run them on a GPU machine with
`python -m pytest tests/test_cuda_graphs.py`. fp32, so the graph and the eager code run the same
kernels and agree to rounding (cuDNN's autotuner may still pick different ones for each trainer).
"""

import pytest
import torch
from conftest import TINY, resumed_trainer

import speed
from ppo_breakout import STATS, Trainer, settings
from run_files import trainer_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

# the tiny configuration on the GPU, with 64 samples (the rollout test counts the actions drawn) and
# 2 epochs (the graph replays from one epoch to the next)
GPU = dict(TINY, worker_steps=32, epochs=2, precision="fp32", device="cuda")


def weights(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def assert_close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


def test_a_graphed_update_trains_as_the_eager_one():
    """Same weights, same samples, same minibatch order: same weights and statistics after two
    updates, the second with other dynamic values. Fails if the capture's warm-up steps stay in
    the weights or in Adam's moments, or a changed learning rate or clip range does not reach
    the graph."""
    with Trainer(*settings(cuda_graphs=False, **GPU)) as eager, Trainer(*settings(cuda_graphs=True, **GPU)) as graphed:
        assert not eager.graphs and graphed.graphs
        assert_close(weights(eager), weights(graphed))
        samples = eager.sample()
        for update, (lr, clip) in enumerate([(1e-3, 0.1), (3e-4, 0.2)]):
            results = []
            for trainer in (eager, graphed):
                trainer.learning_rate._value, trainer.clip_range._value = lr, clip
                torch.manual_seed(update)  # the same minibatch order for both
                results.append(trainer.train(samples))
            assert_close(weights(eager), weights(graphed))
            for key in STATS:
                assert results[1][key] == pytest.approx(results[0][key], rel=1e-3, abs=1e-6), (update, key)
            assert results[1]["clip_range"] == clip and results[1]["learning_rate"] == lr
        assert isinstance(graphed.train_step, speed.GraphedTrainStep) and graphed.train_step.graph is not None
        # learning rate 0: Adam's step moves nothing, so the graph reads the new value
        graphed.learning_rate._value = 0.0
        before = weights(graphed)
        graphed.train(samples)
        torch.testing.assert_close(weights(graphed), before, rtol=0, atol=0)


def test_a_graphed_rollout_records_what_the_model_says():
    """Each recorded value and log-probability is the model's, eagerly, on the recorded frames
    and actions (fails if a replay reads stale frames), and the actions are random draws (fails
    if each replay reuses the same random numbers)."""
    with Trainer(*settings(cuda_graphs=True, **GPU)) as trainer:
        samples = trainer.sample()
        assert sorted(trainer.act.recorded) == [2]  # one graph, for a step's batch of 2 workers
        with torch.no_grad():
            pi, value = trainer.model(samples["obs"])
        torch.testing.assert_close(value, samples["values"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pi.log_prob(samples["actions"]), samples["log_pis"], rtol=1e-4, atol=1e-5)
        counts = torch.bincount(samples["actions"], minlength=4)
        assert (counts >= 5).all(), counts  # 64 draws from a near-uniform policy over 4 actions


def test_a_graphed_run_resumes_from_its_checkpoint_on_the_gpu_and_the_cpu():
    """A checkpoint of a graphed trainer holds a plain learning rate; a graphed trainer resumed from
    it (its capture's warm-up undone on loaded Adam moments) trains as the original goes on."""
    with Trainer(*settings(cuda_graphs=True, **GPU)) as first:
        samples = first.sample()
        first.train(samples)
        state = trainer_state(first)
        assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
        with resumed_trainer(state, cuda_graphs=True, **GPU) as resumed:
            for trainer in (first, resumed):
                torch.manual_seed(7)
                trainer.train(samples)
            assert_close(weights(first), weights(resumed))
    cpu = {**GPU, "device": "cpu"}
    with resumed_trainer(state, **cpu) as on_cpu:
        assert on_cpu.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
        on_cpu.train({k: v.cpu() for k, v in samples.items()})
