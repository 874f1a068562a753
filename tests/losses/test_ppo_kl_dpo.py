"""PPO, KL and DPO pieces against numbers derived by hand."""

import math

import pytest
import torch

from alignkit.losses.dpo import dpo_loss
from alignkit.losses.kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k3
from alignkit.losses.ppo import gae, masked_mean, masked_var, masked_whiten, policy_loss, token_rewards, value_loss


def test_masked_whitening():
    """[1, 2, 3, 4] under mask [0, 1, 1, 0]: mean 2.5, unbiased variance ((-.5)^2 + .5^2) / 1 = 0.5,
    whitened values -+0.5 / sqrt(0.5) = -+0.70711, masked entries 0."""
    x, m = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, m).item() == 2.5
    assert masked_var(x, m).item() == pytest.approx(0.5)
    assert torch.allclose(masked_whiten(x, m), torch.tensor([[0.0, -0.70711, 0.70711, 0.0]]), atol=1e-5)


def test_masked_whitening_over_processes():
    """Two processes each holding [2, 3] (mask [0,1,1,0] of [1,2,3,4]): together 4 entries 2,3,2,3,
    mean 2.5, unbiased variance 4 * 0.25 / 3 = 1/3, whitened -+0.5 * sqrt(3) = -+0.86603. An all_sum
    that doubles each local sum plays the part of the sum over two identical processes."""
    x, m = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    together = masked_whiten(x, m, all_sum=lambda t: 2 * t)
    assert torch.allclose(together, torch.tensor([[0.0, -0.86603, 0.86603, 0.0]]), atol=1e-5)
    assert torch.allclose(together, masked_whiten(torch.cat([x, x]), torch.cat([m, m]))[:1])


def test_gae_lambda_zero():
    """gamma 0.5, lambda 0, values [0, 1, 2, 3], rewards [0, 0, 1, 0]: A_t = r_t + 0.5 V_{t+1} - V_t
    = [0 + 0.5 - 0, 0 + 1 - 1, 1 + 1.5 - 2, 0 + 0 - 3] = [0.5, 0, 0.5, -3]."""
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 2.0, 3.0]]),
                   torch.ones(1, 4), gamma=0.5, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.0, 0.5, -3.0]]))
    assert torch.allclose(ret, adv + torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


def test_gae_monte_carlo_and_padding():
    """gamma = lambda = 1: A_t = sum of rewards from t on - V_t. Rewards [1, 2, 3], values 0.5:
    A = [5.5, 4.5, 2.5], returns [6, 5, 3]. A padded fourth position (mask 0, junk value 9) changes nothing."""
    adv, ret = gae(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.5, 9.0]]),
                   torch.tensor([[1.0, 1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[5.5, 4.5, 2.5, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))


def test_kl_estimators():
    """p = 0.5, q = 0.25: k1 = log 2 = 0.693147; r = q/p = 0.5, k3 = (0.5 - 1) - log 0.5 = 0.193147."""
    lp, lq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(lp, lq).item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_k3(lp, lq).item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_k3(lq, lp).item() >= 0 and kl_k3(lp, lp).item() == 0


def test_token_rewards():
    """score 2 on the last real token, -0.5 * KL elsewhere: KL [0.1, 0.2, 0.3, pad] -> [-0.05, -0.1, 1.85, 0]."""
    r = token_rewards(torch.tensor([2.0]), torch.tensor([[0.1, 0.2, 0.3, 0.7]]), 0.5, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, 1.85, 0.0]]))


def test_policy_loss_clipping():
    """clip 0.2, ratio 1.5 on two tokens. A = +1: max(-1.5, -1.2) = -1.2 (clipped). A = -1:
    max(1.5, 1.2) = 1.5 (not clipped). Mean 0.15, clip fraction 0.5."""
    logp = torch.log(torch.tensor([[1.5, 1.5]]))
    loss, stats = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert stats["clipfrac"] == 0.5


def test_value_loss_clipping():
    """V 2, old V 1, return 3, clip 0.5: clipped V = 1.5; max((2-3)^2, (1.5-3)^2) = 2.25; loss 1.125."""
    loss, stats = value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.5)
    assert loss.item() == pytest.approx(1.125)
    assert stats["vf_clipfrac"] == 1.0


def test_adaptive_kl_controller():
    """init 0.2, target 6, horizon 10000; KL 9 over 256 steps: error = clip(9/6 - 1, .2) = 0.2,
    coef = 0.2 (1 + 0.2 * 256 / 10000) = 0.201024. KL 3: error -0.5 clipped to -0.2: x 0.99488."""
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.201024)
    assert c.update(3.0, 256) == pytest.approx(0.201024 * (1 - 0.2 * 256 / 10000))
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(c.state_dict())
    assert restored.coef == c.coef and FixedKLController(0.1).update(100.0, 10) == 0.1


def test_dpo_loss():
    """All log-probs equal: -log sigmoid(0) = log 2 = 0.693147. Policy raises the chosen log-prob by 1,
    beta 0.1: margin 0.1, -log sigmoid(0.1) = log(1 + e^-0.1) = 0.644397."""
    z = torch.zeros(1)
    assert dpo_loss(z, z, z, z, beta=0.1)[0].item() == pytest.approx(0.693147, abs=1e-6)
    loss, margin = dpo_loss(torch.ones(1), z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    assert margin.item() == pytest.approx(0.1)
    # the reference cancels: the same shift in policy and reference changes nothing
    shifted = dpo_loss(torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([2.0]), beta=0.1)
    assert shifted[0].item() == pytest.approx(0.644397, abs=1e-6)
