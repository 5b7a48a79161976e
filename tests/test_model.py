import torch
from torch.distributions import Categorical

from ppo_breakout import Model


def test_under_bf16_autocast_the_heads_compute_in_fp32_on_the_features():
    torch.manual_seed(0)
    model = Model(n_actions=4)
    obs = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    features = []
    model.pi_logits.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        pi, value = model(obs)
    (h,) = features
    # the trunk ran in bf16 (its features carry bf16's rounding), the heads did not
    assert torch.equal(h, h.to(torch.bfloat16).float())
    with torch.no_grad():
        logits = torch.nn.functional.linear(h.float(), model.pi_logits.weight, model.pi_logits.bias)
        expected_value = torch.nn.functional.linear(h.float(), model.value.weight, model.value.bias).reshape(-1)
    assert pi.logits.dtype == value.dtype == torch.float32
    assert torch.equal(pi.logits, Categorical(logits=logits).logits)
    assert torch.equal(value, expected_value)
