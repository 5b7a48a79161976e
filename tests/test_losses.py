import math

import pytest
import torch
from labml_nn.rl.ppo import ClippedPPOLoss as ReferencePPOLoss
from labml_nn.rl.ppo import ClippedValueFunctionLoss as ReferenceValueLoss

from ppo_breakout import ClippedPPOLoss, ClippedValueFunctionLoss


def _grad(loss_fn, leaf, *args):
    leaf = leaf.clone().requires_grad_(True)
    loss = loss_fn(leaf, *args)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("clip", [0.05, 0.1, 0.3])
def test_ppo_loss_equals_labml_nn_in_value_gradient_and_clip_fraction(clip):
    g = torch.Generator().manual_seed(1)
    log_pi = torch.randn(512, generator=g) * 0.2 - 1.0
    sampled_log_pi = log_pi + torch.randn(512, generator=g) * 0.15
    advantage = torch.randn(512, generator=g)
    ours, reference = ClippedPPOLoss(), ReferencePPOLoss()
    loss, grad = _grad(ours, log_pi, sampled_log_pi, advantage, clip)
    ref_loss, ref_grad = _grad(reference, log_pi, sampled_log_pi, advantage, clip)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(ours.clip_fraction, reference.clip_fraction)
    assert 0 < ours.clip_fraction < 1


def test_clip_fraction_counts_ratios_outside_the_clip_range():
    ratios = torch.tensor([1.0, 1.05, 1.3, 0.7, 0.95, 1.2])
    loss_fn = ClippedPPOLoss()
    loss_fn(ratios.log(), torch.zeros(6), torch.ones(6), 0.1)
    assert loss_fn.clip_fraction.item() == pytest.approx(3 / 6)


def test_ppo_loss_stops_the_gradient_once_the_ratio_leaves_the_clip_range():
    # ratio 1.5 with a positive advantage: already far enough, no further push
    _, grad = _grad(ClippedPPOLoss(), torch.tensor([math.log(1.5)]), torch.zeros(1), torch.ones(1), 0.2)
    assert grad.item() == 0.0
    _, grad = _grad(ClippedPPOLoss(), torch.tensor([math.log(1.1)]), torch.zeros(1), torch.ones(1), 0.2)
    assert grad.item() < 0  # minimising the loss raises log_pi


@pytest.mark.parametrize("clip", [0.1, 0.5])
def test_value_loss_equals_labml_nn_in_value_and_gradient(clip):
    g = torch.Generator().manual_seed(2)
    value = torch.randn(256, generator=g)
    sampled_value = value + torch.randn(256, generator=g) * 0.3
    sampled_return = torch.randn(256, generator=g)
    loss, grad = _grad(ClippedValueFunctionLoss(), value, sampled_value, sampled_return, clip)
    ref_loss, ref_grad = _grad(ReferenceValueLoss(), value, sampled_value, sampled_return, clip)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_value_loss_by_hand():
    # value moved 1.0 from the sampled 0.0, clip 0.2 -> clipped value 0.2; return 2.0
    # max((1 - 2)^2, (0.2 - 2)^2) / 2 = 3.24 / 2
    loss = ClippedValueFunctionLoss()(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.2)
    assert loss.item() == pytest.approx(1.62)
