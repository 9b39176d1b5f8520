"""SCoRe: training self-correction with two-attempt RL (Kumar et al. 2024, "Training Language Models to
Self-Correct via Reinforcement Learning", arXiv 2409.12917, section 5). `hyperparameters.selfCorrection: score`.

Every rollout has two attempts (turns 2): the policy answers (y1, reward r1), the environment asks it
to correct itself, the policy answers again (y2, r2). Training has two stages, told by the step alone
(so a resumed job continues in the stage its checkpoint's step belongs to):
- stage I, steps 1..scoreStageOneSteps (eq. 3): maximise r2 while a strong KL (scoreFirstTurnKlCoef,
  the paper's beta2) holds the first attempt to the reference policy; the per-attempt rewards are
  (0, r2): the first attempt gets no policy gradient, only its KL (beta2), the second attempt is
  trained on r2 with klCoef (beta1). The result is an initialisation whose second attempt improves
  on a first attempt that stays like the base model's, so stage II does not collapse onto "answer
  once and repeat it".
- stage II, the steps after (eq. 4 with the bonus of eq. 5): both attempts trained, rewards
  (r1, r2 + alpha * (r2 - r1)), KL klCoef on every token. The bonus pays for turning a wrong answer
  into a right one and charges for the opposite, beyond what r2 alone does.
Each attempt is credited with its own reward (TurnPlan.own_turn_credit), not with the rewards of the
turns after it as plain multi-turn rollouts are: the bonus depends on y1 too, and credited to the first
attempt it would pay (1 - alpha) r1 for it, i.e. reward a deliberately wrong first answer. Measured
(bench/RESULTS.md "SCoRe vs single-turn GRPO", first table): with returns-to-go accuracy@t1 fell to 0.
The paper optimises this with REINFORCE and a KL penalty; here the per-turn rewards go to PPO, GRPO
or RLOO (losses.turns). Metrics (the paper's table 2): accuracy@t1, accuracy@t2, their difference
delta(t1, t2), and the shares of problems wrong->right and right->wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAGE_ONE, STAGE_TWO = 1, 2


def stage_of(step: int, stage_one_steps: int) -> int:
    """The SCoRe stage of optimizer step `step` (1-based): STAGE_ONE for 1..stage_one_steps, else STAGE_TWO."""
    return STAGE_ONE if step <= stage_one_steps else STAGE_TWO


def shaped_turn_rewards(turn_scores: torch.Tensor, stage: int, alpha: float) -> torch.Tensor:
    """(B, 2) attempt scores (r1, r2) -> (B, 2) the per-turn rewards of `stage`:
    stage I (0, r2); stage II (r1, r2 + alpha * (r2 - r1))."""
    r1, r2 = turn_scores[:, 0], turn_scores[:, 1]
    if stage == STAGE_ONE:
        return torch.stack([torch.zeros_like(r1), r2], dim=1)
    return torch.stack([r1, r2 + alpha * (r2 - r1)], dim=1)


def turn_kl_coefs(stage: int, kl_coef: float, first_turn_kl_coef: float) -> tuple[float, float]:
    """The KL coefficients of the two attempts in `stage`: (beta2, beta1) in stage I, (beta1, beta1) after."""
    return (first_turn_kl_coef, kl_coef) if stage == STAGE_ONE else (kl_coef, kl_coef)


def correction_metrics(turn_scores: torch.Tensor, pass_score: float) -> dict[str, float]:
    """(B, K) per-turn scores -> accuracy of the first and last attempt (share scoring >= pass_score),
    their difference, and the shares of rows wrong -> right and right -> wrong between them."""
    first, last = turn_scores[:, 0] >= pass_score, turn_scores[:, -1] >= pass_score
    accuracy_t1, accuracy_t2 = float(first.float().mean()), float(last.float().mean())
    return {"accuracy_t1": accuracy_t1, "accuracy_t2": accuracy_t2, "accuracy_delta": accuracy_t2 - accuracy_t1,
            "wrong_to_right": float((~first & last).float().mean()),
            "right_to_wrong": float((first & ~last).float().mean())}


@dataclass(frozen=True)
class TurnPlan:
    """What a multi-turn step trains on.

    rewards: (B, K) each turn's reward (SCoRe: shaped); kl_coefs: the KL coefficient of each turn's
    tokens (K,); stage: the SCoRe stage, or None without selfCorrection; own_turn_credit: each turn's
    tokens are credited with that turn's reward only (SCoRe), else with its return-to-go (the
    rewards of that turn and every later one).
    """

    rewards: torch.Tensor
    kl_coefs: tuple[float, ...]
    stage: int | None
    own_turn_credit: bool


def turn_plan(turn_scores: torch.Tensor, *, step: int, hp, kl_coef: float) -> TurnPlan:
    """The TurnPlan of optimizer step `step` for per-turn scores (B, K). Without selfCorrection every
    turn's reward is its score, credited as returns-to-go, and every token weighs the KL by kl_coef
    (the PPO controller's value, or klCoef)."""
    if hp.self_correction == "score":
        stage = stage_of(step, hp.score_stage_one_steps)
        return TurnPlan(shaped_turn_rewards(turn_scores, stage, hp.score_alpha),
                        turn_kl_coefs(stage, kl_coef, hp.score_first_turn_kl_coef), stage, own_turn_credit=True)
    return TurnPlan(turn_scores, (kl_coef,) * turn_scores.shape[1], None, own_turn_credit=False)
