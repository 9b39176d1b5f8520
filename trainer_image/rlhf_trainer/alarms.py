"""Alarms on what the policy does (online algorithms): the pitfalls StackLLaMA and the RLHF papers name.

Per step the actor computes signals from its rollout and an `AlarmMonitor` turns them into alarms;
each threshold is a hyperparameter (0 turns that alarm off):

| reason        | signal (metric)                                     | fires when                                      |
|---------------|-----------------------------------------------------|-------------------------------------------------|
| NegativeKL    | kl (mean per-response KL over the whole batch),     | kl < -alarm_negative_kl and kl < -4 kl_stderr:   |
|               | kl_stderr (its standard error), kl_negative_share   | the samples do not come from the policy the      |
|               | (share of negative per-token k1 terms)              | log-probs describe (forced / suppressed tokens,  |
|               |                                                     | padding), and PPO chases it                      |
| LengthCollapse| response_length, response_length_change (the mean   | the last alarm_window steps' mean length is      |
|               | of the last window over the window before, minus 1) | below (1 - alarm_length_drop) x the window's     |
|               |                                                     | before                                           |
| RewardHacking | distinct_2 (unique bigrams / bigrams inside each    | distinct_2 < alarm_distinct (a string repeated   |
|               | response, responses of >= 3 tokens)                 | for the reward), or the reward rose by more than |
|               | reward_mean against eval_reward_mean                | alarm_reward_jump between two evaluations while  |
|               |                                                     | the held-out reward rose by less than half that  |

Pure: tensors and numbers in, (signals, alarms) out. The actor publishes them as the
`rlhf_trainer_alarm{reason}` gauges and the `rlhf_trainer_alarms_info` series (reason -> message),
which the operator turns into a `Degraded` condition and a Warning event (docs/spec.md "Alarms"),
and the chart's Prometheus rules alert on (charts/rlhf-operator/rules/).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

REASONS = ("NegativeKL", "LengthCollapse", "RewardHacking")
# The k1 estimate of KL >= 0 is negative by chance when the batch is small and the policy near the
# reference (a step of 8 responses of 2 tokens: true KL 0.04, estimate -0.2, 75% of the terms negative).
# NegativeKL asks for a mean this many standard errors below 0 (one-sided p ~ 3e-5 per step).
NEGATIVE_KL_STDERRS = 4.0
# Responses shorter than this many tokens have too few bigrams to say anything about repetition.
MIN_TOKENS_FOR_DISTINCT = 3


@dataclass(frozen=True)
class KLSignals:
    mean: float  # mean over the batch's responses of the summed per-token k1 terms (nats)
    stderr: float  # standard error of that mean (nats): std of the per-response sums / sqrt(responses)
    negative_share: float  # share of response tokens whose k1 term is negative


def kl_signals(kl_per_token: torch.Tensor, action_mask: torch.Tensor, reduce=lambda t: t) -> KLSignals:
    """The NegativeKL signals of the whole actor batch from each rank's (B, R) k1 terms (log pi - log pi_ref,
    any value off the mask) and (B, R) action mask: `reduce` sums a tensor over the actor ranks
    (distributed.all_reduce_tensor), so every rank gets the same signals and a rank's few rows do not
    alarm alone."""
    mask = action_mask.bool()
    per_response = torch.where(mask, kl_per_token, 0).double().sum(-1)
    n, total, squares, negative, tokens = reduce(torch.stack([
        torch.tensor(float(per_response.numel()), dtype=torch.float64, device=per_response.device),
        per_response.sum(), (per_response ** 2).sum(),
        ((kl_per_token < 0) & mask).sum().double(), mask.sum().double()])).tolist()
    if n == 0:
        return KLSignals(0.0, 0.0, 0.0)
    mean = total / n
    variance = max(squares / n - mean ** 2, 0.0) * n / (n - 1) if n > 1 else 0.0
    return KLSignals(mean, (variance / n) ** 0.5, negative / tokens if tokens else 0.0)


def distinct_2(response_ids: torch.Tensor, action_mask: torch.Tensor) -> float | None:
    """Mean over responses of (unique bigrams / bigrams) inside each, for responses of at least
    MIN_TOKENS_FOR_DISTINCT tokens (Li et al. 2016's distinct-n, per response); None if none is long enough."""
    ratios = []
    for ids, mask in zip(response_ids.tolist(), action_mask.tolist(), strict=True):
        tokens = [t for t, m in zip(ids, mask, strict=True) if m]
        if len(tokens) < MIN_TOKENS_FOR_DISTINCT:
            continue
        bigrams = list(zip(tokens, tokens[1:], strict=False))
        ratios.append(len(set(bigrams)) / len(bigrams))
    return sum(ratios) / len(ratios) if ratios else None


@dataclass(frozen=True)
class Thresholds:
    negative_kl: float  # NegativeKL when the mean KL < -negative_kl, by NEGATIVE_KL_STDERRS (0 = off)
    length_drop: float  # LengthCollapse when the window's length < (1 - length_drop) x the one before (0 = off)
    distinct: float  # RewardHacking when distinct_2 < distinct (0 = off)
    reward_jump: float  # RewardHacking when the reward rose by > reward_jump between evaluations ... (0 = off)
    window: int  # steps per length window

    @classmethod
    def of(cls, hp) -> Thresholds:
        return cls(hp.alarm_negative_kl, hp.alarm_length_drop, hp.alarm_distinct, hp.alarm_reward_jump,
                   hp.alarm_window)


class AlarmMonitor:
    """The alarms of one actor process, step after step (it keeps the recent lengths and the rewards
    at the last evaluation, saved in the actor's checkpoints). `step()` returns the step's signals and
    the alarms firing now."""

    def __init__(self, thresholds: Thresholds):
        self.t = thresholds
        self.lengths: deque[float] = deque(maxlen=2 * thresholds.window)
        self.rewards: deque[float] = deque(maxlen=thresholds.window)
        self.last_eval: tuple[float, float] | None = None  # (training reward, held-out reward) then

    def step(self, *, kl: KLSignals, length: float, distinct: float | None,
             reward: float) -> tuple[dict[str, float], dict[str, str]]:
        t, alarms = self.t, {}
        signals = {"kl_stderr": kl.stderr, "kl_negative_share": kl.negative_share}
        if t.negative_kl > 0 and kl.mean < -t.negative_kl and kl.mean < -NEGATIVE_KL_STDERRS * kl.stderr:
            alarms["NegativeKL"] = (f"mean KL {kl.mean:.4g} < -{t.negative_kl:g}, {-kl.mean / kl.stderr if kl.stderr else math.inf:.3g} "
                                    f"standard errors below 0 ({kl.negative_share:.0%} of the per-token terms "
                                    "negative): samples do not follow the policy's log-probs")
        self.lengths.append(length)
        if len(self.lengths) == self.lengths.maxlen:
            before = sum(list(self.lengths)[:t.window]) / t.window
            now = sum(list(self.lengths)[t.window:]) / t.window
            change = now / before - 1 if before > 0 else 0.0
            signals["response_length_change"] = change
            if t.length_drop > 0 and change < -t.length_drop:
                alarms["LengthCollapse"] = (f"mean response length {now:.3g} tokens over the last {t.window} steps, "
                                            f"{-change:.0%} below the {before:.3g} of the {t.window} before")
        if distinct is not None:
            signals["distinct_2"] = distinct
            if t.distinct > 0 and distinct < t.distinct:
                alarms["RewardHacking"] = (f"distinct-2 of the responses {distinct:.3g} < {t.distinct:g}: "
                                           "they repeat themselves")
        self.rewards.append(reward)
        return signals, alarms

    def state_dict(self) -> dict:
        """The windows and the last evaluation, for the actor's checkpoint: a resumed run's alarms then
        compare against the steps before the resume, as an unbroken run's would."""
        return {"lengths": list(self.lengths), "rewards": list(self.rewards),
                "last_eval": list(self.last_eval) if self.last_eval is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()'s output; a window edited between the runs keeps its newest values."""
        self.lengths = deque((float(v) for v in state["lengths"]), maxlen=2 * self.t.window)
        self.rewards = deque((float(v) for v in state["rewards"]), maxlen=self.t.window)
        last = state["last_eval"]
        self.last_eval = None if last is None else (float(last[0]), float(last[1]))

    def evaluated(self, held_out_reward: float | None) -> dict[str, str]:
        """At an evaluation: RewardHacking when the training reward (mean of the recent window) rose by
        more than reward_jump since the last evaluation while the held-out reward rose by less than half."""
        if held_out_reward is None or not self.rewards:
            return {}
        train = sum(self.rewards) / len(self.rewards)
        previous, self.last_eval = self.last_eval, (train, held_out_reward)
        if previous is None or self.t.reward_jump <= 0:
            return {}
        jump, held_out = train - previous[0], held_out_reward - previous[1]
        if jump > self.t.reward_jump and held_out < jump / 2:
            return {"RewardHacking": f"the training reward rose by {jump:.3g} since the last evaluation, the "
                                     f"held-out reward by {held_out:.3g}"}
        return {}


def merge(*alarm_sets: dict[str, str]) -> dict[str, str]:
    """Alarms by reason in REASONS order (messages of one reason joined)."""
    out: dict[str, list[str]] = {}
    for alarms in alarm_sets:
        for reason, message in alarms.items():
            out.setdefault(reason, []).append(message)
    return {r: "; ".join(out[r]) for r in REASONS if r in out}

