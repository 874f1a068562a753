"""SFT loss against numbers derived by hand."""

import math

import torch

from alignkit.losses.sft import IGNORE, sft_loss_sum


def test_uniform_logits_masked_prompt():
    """Zero logits over V=4 give -log(1/4) = ln 4 = 1.386294 per token.

    Sequence of 4 tokens, labels [IGNORE, IGNORE, 2, 3]: after the one-position shift, positions
    1 and 2 are scored (targets 2 and 3), so sum = 2 ln 4 = 2.772589 over 2 tokens.
    """
    logits = torch.zeros(1, 4, 4, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, 2, 3]])
    total, count = sft_loss_sum(logits, labels)
    assert count.item() == 2
    assert math.isclose(total.item(), 2.772589, abs_tol=1e-6)


def test_peaked_logit():
    """logits [2, 0, 0] with target 0: -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2) = log(1.270671) = 0.239545."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 0]])
    total, count = sft_loss_sum(logits, labels)
    assert count.item() == 1
    assert math.isclose(total.item(), 0.239545, abs_tol=1e-6)


def test_prompt_positions_do_not_matter():
    """Changing logits where the next label is IGNORE leaves the loss and its gradient source alone."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 4, 1], [IGNORE, 3, 3, IGNORE, IGNORE]])
    base, count = sft_loss_sum(logits, labels)
    changed = logits.clone()
    changed[0, :2] += 100.0  # positions predicting labels[0, 1:3], both IGNORE
    changed[1, 3:] -= 50.0  # positions predicting labels[1, 4] (IGNORE) and beyond the end
    assert count.item() == 4
    assert torch.allclose(sft_loss_sum(changed, labels)[0], base)
    changed[0, 2, 4] += 1.0  # raises the logit of labels[0, 3] = 4: must change the loss
    assert not torch.allclose(sft_loss_sum(changed, labels)[0], base)
