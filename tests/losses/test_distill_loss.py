"""Knowledge-distillation loss against values derived by hand."""

import math

import pytest
import torch

from alignkit.losses.distill import distill_loss, distill_sums, hidden_mse_sum


def two_token_case():
    """Vocabulary of 2, one scored position: logits at t=0 predict labels[1] = 0.
    Teacher logits [0, 0]; student logits [ln 3, 0]. Position 1 is unscored (no label after it)."""
    teacher = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    student = torch.tensor([[[math.log(3.0), 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[-100, 0]])
    return student, teacher, labels


def test_kl_and_ce_at_temperature_one_by_hand():
    """T = 1: p = [1/2, 1/2], q = [3/4, 1/4].
    KL(p || q) = 1/2 ln(0.5/0.75) + 1/2 ln(0.5/0.25) = 1/2 ln(4/3) = 0.143841.
    CE(label 0) = -ln(3/4) = 0.287682. One labelled token."""
    kl, ce, n = distill_sums(*two_token_case(), temperature=1.0)
    assert kl.item() == pytest.approx(0.143841, abs=1e-6)
    assert ce.item() == pytest.approx(0.287682, abs=1e-6)
    assert n.item() == 1


def test_full_loss_at_temperature_two_by_hand():
    """T = 2: student logits [ln 3 / 2, 0] give q = [sqrt3, 1] / (sqrt3 + 1) = [0.633975, 0.366025];
    KL = 1/2 ln(0.5/q0) + 1/2 ln(0.5/q1) = 1/2 ln(0.25 / (q0 q1)) = 1/2 ln(0.25 / 0.2320508) = 1/2 ln(1.0773503) = 0.0372523.
    CE is taken at T = 1: 0.287682. With alpha 0.5:
    0.5 * 2^2 * 0.0372523 + 0.5 * 0.287682 = 0.0745046 + 0.143841 = 0.218346."""
    kl, ce, n = distill_sums(*two_token_case(), temperature=2.0)
    assert kl.item() == pytest.approx(0.0372523, abs=1e-6)
    assert distill_loss(kl, ce, alpha=0.5, temperature=2.0).item() == pytest.approx(0.218346, abs=1e-6)
    # alpha 1 is the soft term alone, alpha 0 the hard term alone.
    assert distill_loss(kl, ce, 1.0, 2.0).item() == pytest.approx(4 * 0.0372523, abs=1e-6)
    assert distill_loss(kl, ce, 0.0, 2.0).item() == pytest.approx(0.287682, abs=1e-6)


def test_masked_positions_and_teacher_get_no_weight_or_gradient():
    """Relabelling the scored token as -100 leaves nothing: KL 0, CE 0, count 0. Only the student gets a
    gradient; at student == teacher the KL is 0 and its gradient vanishes."""
    student, teacher, labels = two_token_case()
    kl, ce, n = distill_sums(student, teacher, torch.full_like(labels, -100), 2.0)
    assert kl.item() == 0 and ce.item() == 0 and n.item() == 0
    s = teacher.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    kl, _, _ = distill_sums(s, t, labels, 3.0)
    kl.backward()
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    assert t.grad is None and torch.allclose(s.grad, torch.zeros_like(s))


def test_hidden_mse_by_hand():
    """Two tokens of width 2: differences [1, 1] and [2, 0] give per-token means 1 and 2; with the
    second token masked out the sum is 1, with both it is 3."""
    s = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    t = torch.zeros(1, 2, 2)
    assert hidden_mse_sum(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(1.0)
    assert hidden_mse_sum(s, t, torch.tensor([[1, 1]])).item() == pytest.approx(3.0)
