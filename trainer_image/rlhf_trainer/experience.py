"""One rollout batch as the actor holds it between sampling and the PPO / GRPO / RLOO update.

Shapes: B rows (prompts x samples per prompt), P prompt tokens (left-padded), R response tokens
(right-padded after the first EOS), so a sequence is P + R tokens and the response starts at
column P. Response-aligned tensors (B, R) are indexed by response position: entry t belongs to
the token sequences[:, P + t] and was predicted from position P + t - 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class Experience:
    sequences: torch.Tensor  # (B, P + R) long: prompt + sampled response token ids
    attention_mask: torch.Tensor  # (B, P + R) long: 1 on real tokens (prompt and response)
    position_ids: torch.Tensor  # (B, P + R) long: positions counting real tokens only
    action_mask: torch.Tensor  # (B, R) long: 1 on response tokens up to and including EOS
    old_logprobs: torch.Tensor  # (B, R) float: actor log-probs at sampling time
    ref_logprobs: torch.Tensor  # (B, R) float: reference log-probs
    scores: torch.Tensor  # (B,) float: reward model / rule score of each response
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens
    advantages: torch.Tensor | None = None  # (B, R) float (GRPO/RLOO: the row's value repeated)
    values: torch.Tensor | None = None  # (B, R) float: critic values at sampling time (PPO)
    returns: torch.Tensor | None = None  # (B, R) float: critic targets (PPO)
    rewards: torch.Tensor | None = None  # (B, R) float: per-token rewards, -beta*KL + score (PPO)
    kl: torch.Tensor | None = None  # (B, R) float: per-token KL estimate
    step_rewards: torch.Tensor | None = None  # (B, R) float: process rewards at step ends (reward.type prm)
    # Multi-turn rollouts (rlhf_trainer.multiturn; K policy turns), else None. action_mask is then 1 on
    # the policy's tokens only: the environment's tokens between turns are no actions.
    turn_ids: torch.Tensor | None = None  # (B, R) long: policy turn 0..K-1 of each action token, -1 elsewhere
    turn_scores: torch.Tensor | None = None  # (B, K) float: each turn's score (scores = the last turn's)
    turn_truncated: torch.Tensor | None = None  # (B, K) bool: turn k sampled no stop token
    turn_rewards: torch.Tensor | None = None  # (B, K) float: what each turn is trained on (SCoRe: shaped)
    kl_coefs: torch.Tensor | None = None  # (B, R) float: each action token's KL coefficient (per turn)
    own_turn_credit: bool = False  # each turn credited with its own reward only (SCoRe), else its return-to-go
    info: dict[str, float] = field(default_factory=dict)  # step statistics for metrics

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.action_mask.shape[1]

    @property
    def num_tokens(self) -> int:
        """Response tokens in this batch (the losses' normaliser when summed over all ranks)."""
        return int(self.action_mask.sum())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str) -> Experience:
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self._tensors().items()})

    def split(self, micro_batch_size: int) -> list[Experience]:
        """Consecutive row slices of at most micro_batch_size rows (info is kept on each)."""
        rows = self.sequences.shape[0]
        return [dataclasses.replace(self, **{k: v[start:start + micro_batch_size]
                                             for k, v in self._tensors().items()})
                for start in range(0, rows, micro_batch_size)]
