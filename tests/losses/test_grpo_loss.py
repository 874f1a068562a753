"""GRPO / Dr. GRPO / RLOO advantages, the clipped token loss, its aggregations and the k3 term,
each against numbers derived by hand in the docstring."""

import math

import pytest
import torch

from alignkit.losses.grpo import (aggregate, clipped_token_loss, dr_grpo_advantages, group_advantages,
                                  grpo_advantages, rloo_advantages)
from alignkit.losses.kl import kl_k3


def test_grpo_advantages_by_hand():
    """Group [1, 0, 0, 1]: mean 0.5, unbiased variance 4 * 0.25 / 3 = 1/3, std 0.57735, so
    advantages +-0.5 / 0.57735 = +-0.866025. Group [3, 1]: mean 2, unbiased std sqrt(2), +-0.707107."""
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025]]), atol=1e-6, rtol=0)
    adv = grpo_advantages(torch.tensor([[3.0, 1.0]]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.707107, -0.707107]]), atol=1e-6, rtol=0)


def test_dr_grpo_advantages_by_hand():
    """Dr. GRPO keeps r - mean: [1, 0, 0, 1] -> [0.5, -0.5, -0.5, 0.5]; [3, 1] -> [1, -1] (not +-0.707)."""
    adv = dr_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]))


def test_rloo_advantages_by_hand():
    """Leave-one-out: for r = [1, 0, 0, 1] the first gets 1 - (0 + 0 + 1) / 3 = 0.667 and the second
    0 - (1 + 0 + 1) / 3 = -0.667; that is k / (k - 1) = 4/3 times r - mean (+-0.5)."""
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    r = torch.tensor([[0.3, -1.2, 2.0]])
    torch.testing.assert_close(rloo_advantages(r), 1.5 * dr_grpo_advantages(r))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_groups_give_zero_advantage_and_are_counted(estimator):
    rewards = torch.tensor([[0.7, 0.7, 0.7], [1.0, 0.0, 0.5], [-2.0, -2.0, -2.0]])
    adv, flat = group_advantages(rewards, estimator)
    assert flat == 2
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))
    assert adv[1, 0] > 0 > adv[1, 1]


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]), "grpo")


def test_clipped_token_loss_by_hand():
    """ratio 1.5 (log-ratio ln 1.5), clip 0.2: A = +1 -> max(-1.5, -1.2) = -1.2 (clipped: no credit past
    1.2); A = -1 -> max(1.5, 1.2) = 1.5. ratio 0.5: A = +1 -> max(-0.5, -0.8) = -0.5; A = -1 ->
    max(0.5, 0.8) = 0.8. With clip_high 0.28 the first becomes -1.28."""
    old = torch.zeros(4, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [math.log(0.5)]])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss = clipped_token_loss(logp, old, adv, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [1.5], [-0.5], [0.8]]))
    assert clipped_token_loss(logp, old, adv, 0.2, 0.28)[0, 0].item() == pytest.approx(-1.28)


def test_clipped_loss_gradient_is_the_policy_gradient_at_ratio_one():
    """At ratio 1 the loss -A r has gradient -A with respect to logp (d exp(x)/dx = 1 at x = 0)."""
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([2.0, -0.5])
    clipped_token_loss(logp, logp.detach(), adv, 0.2, 0.2).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0] * 3, [0.5] * 3]))


def test_aggregations_by_hand():
    """per-token [[1, 2, 3], [4, x, x]] with the x masked out: token = (1+2+3+4) / 4 = 2.5; sequence =
    (6/3 + 4/1) / 2 = 3; fixed with max_tokens 4 = 10 / (2 * 4) = 1.25. Split into two halves with the
    global counts passed, the halves add up to the whole."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(x, m, "token").item() == pytest.approx(2.5)
    assert aggregate(x, m, "sequence").item() == pytest.approx(3.0)
    assert aggregate(x, m, "fixed", max_tokens=4).item() == pytest.approx(1.25)
    for how in ("token", "sequence", "fixed"):
        whole = aggregate(x, m, how, max_tokens=4)
        parts = sum(aggregate(x[i:i + 1], m[i:i + 1], how, n_tokens=4, n_seqs=2, max_tokens=4) for i in (0, 1))
        assert parts.item() == pytest.approx(whole.item())
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(x, m, "fixed")


def test_k3_by_hand():
    """p = 0.5, q = 0.25: r = q/p = 0.5, k3 = (r - 1) - ln r = -0.5 + 0.693147 = 0.193147; 0 when p = q."""
    k3 = kl_k3(torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3])))
    torch.testing.assert_close(k3, torch.tensor([0.193147, 0.0]), atol=1e-6, rtol=0)
