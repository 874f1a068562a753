"""Per-token KL estimators between policy and reference, and the KL-coefficient controllers."""

from __future__ import annotations

import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p(x) - log q(x) for x ~ p: unbiased for KL(p || q), high variance, can be negative.

    Schulman, "Approximating KL Divergence" (2020), estimator k1.
    """
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = q(x) / p(x), x ~ p: unbiased for KL(p || q), low variance, >= 0.

    Schulman, "Approximating KL Divergence" (2020), estimator k3.
    """
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.coef = coef

    def update(self, observed_kl: float, n_steps: int) -> float:
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = state["coef"]


class AdaptiveKLController:
    """Moves the KL coefficient toward a target KL with a clipped proportional controller.

    error = clip(KL / target - 1, -0.2, 0.2); coef <- coef * (1 + error * n_steps / horizon).
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = init_coef, target, horizon

    def update(self, observed_kl: float, n_steps: int) -> float:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.target, self.horizon = state["coef"], state["target"], state["horizon"]
