"""Reward losses against numbers derived by hand."""

import math

import torch

from alignkit.losses.reward import bradley_terry_loss, reward_centering, soft_bradley_terry_loss


def test_chosen_one_rejected_zero():
    """-log sigmoid(1 - 0) = log(1 + e^-1) = log(1.367879) = 0.313262."""
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert math.isclose(loss.item(), 0.313262, abs_tol=1e-6)


def test_margin_one():
    """With margin 1: -log sigmoid(1 - 0 - 1) = -log(1/2) = log 2 = 0.693147."""
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert math.isclose(loss.item(), 0.693147, abs_tol=1e-6)


def test_centering_and_mean():
    """Pairs (1, 0) and (0, 1): BT losses 0.313262 and log(1 + e) = 1.313262, mean 0.813262.
    Centering (1 + 0)^2 = 1 for both, so with coefficient 0.01 the mean loss is 0.823262."""
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(reward_centering(rc, rr), torch.tensor([1.0, 1.0]))
    loss = (bradley_terry_loss(rc, rr) + 0.01 * reward_centering(rc, rr)).mean()
    assert math.isclose(loss.item(), 0.823262, abs_tol=1e-6)


def test_gradient_pushes_chosen_up():
    rc = torch.tensor([0.0], requires_grad=True)
    rr = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(rc, rr).sum().backward()
    # d/dx -log sigmoid(x) at 0 = -(1 - sigmoid(0)) = -0.5
    assert rc.grad.item() == -0.5 and rr.grad.item() == 0.5


def test_soft_labels():
    """d = 1 - 0 = 1, p = 0.8: -(0.8 log sigmoid(1) + 0.2 log sigmoid(-1)) = 0.8 * 0.313262 + 0.2 * 1.313262
    = 0.513262. p = 1 is the plain loss (0.313262); at d = 0 any p gives log 2 = 0.693147."""
    rc, rr = torch.tensor([1.0, 1.0, 0.5]), torch.tensor([0.0, 0.0, 0.5])
    loss = soft_bradley_terry_loss(rc, rr, torch.tensor([0.8, 1.0, 0.3]))
    assert torch.allclose(loss, torch.tensor([0.513262, 0.313262, 0.693147]), atol=1e-6)
