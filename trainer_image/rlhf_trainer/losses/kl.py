"""KL estimators and KL-coefficient controllers.

Estimators of KL(pi || pi_ref) from samples x ~ pi, with log r = log pi_ref(x) - log pi(x)
(J. Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html):
    k1 = -log r             unbiased, high variance, can be negative per token
    k3 = (r - 1) - log r    unbiased, always >= 0, low variance (GRPO's KL term)
Controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2):
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2);   beta_{t+1} = beta_t * (1 + K_beta * e_t),
with K_beta = n_steps / horizon.
"""

from __future__ import annotations

import torch

# exp() of a large log-ratio overflows; 20 nats is already a hopeless policy.
_LOG_RATIO_BOUND = 20.0


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return torch.expm1(log_ratio) - log_ratio


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate with `estimator` k1 | k3 (same shape as the inputs)."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 | k3)")


class FixedKLController:
    """A constant KL coefficient (kl_target == 0)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef
        self.initial = kl_coef  # the configured klCoef this controller started from

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "initial": self.initial}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """The saved coefficient, unless klCoef was edited since (a rolled-out spec edit): then the new one."""
        if float(state.get("initial", self.initial)) == self.initial:
            self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Moves the coefficient so the measured KL approaches `target` (Ziegler et al. 2019)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def build_kl_controller(kl_coef: float, kl_target: float, kl_horizon: int) -> FixedKLController:
    """kl_target 0 -> fixed coefficient, else adaptive (the RLHFJob `klTarget` field)."""
    if kl_target > 0:
        return AdaptiveKLController(kl_coef, kl_target, kl_horizon)
    return FixedKLController(kl_coef)
