"""What the policy writes: every `sample_interval_steps` steps, the first `samples_per_step` rollouts of
each actor rank go to `$RLHF_CHECKPOINT_DIR/samples/<role>-<rank>.jsonl`, one JSON object per line:

    {"step": 10, "prompt": "2+2=", "response": "4", "reward": 1.0, "kl": 0.31, "length": 2, "truncated": false}

`kl` is the response's summed per-token KL estimate against the reference (the training loss's
estimator), `length` its tokens up to and including EOS, `truncated` true when no EOS came within
max_new_tokens. `rlhf-operator report` shows them as a table; the newest one also goes to the
`rlhf_trainer_sample` info series, from which the operator copies a short `status.progress.lastSample`
(as TRL's `log_completions` / OpenRLHF's sample dumps, but kept on the checkpoint volume).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Characters of a prompt / response kept in the info series (the status line is shorter still).
INFO_TEXT = 200


@dataclass(frozen=True)
class Sample:
    step: int
    prompt: str
    response: str
    reward: float
    kl: float | None
    length: int
    truncated: bool


def due(step: int, interval: int) -> bool:
    """Samples are written at steps interval, 2 x interval, ...; interval 0 = never."""
    return interval > 0 and step % interval == 0


def pick(step: int, prompts: Sequence[str], responses: Sequence[str], scores: torch.Tensor,
         kl_per_token: torch.Tensor | None, action_mask: torch.Tensor, truncated: torch.Tensor,
         count: int) -> list[Sample]:
    """The first `count` rows of a rollout: (B,) scores and truncated, (B, R) per-token KL and mask."""
    rows = min(count, len(prompts))
    lengths = action_mask.sum(-1)
    kl = None if kl_per_token is None else (kl_per_token * action_mask).sum(-1)
    return [Sample(step, prompt_text(prompts[i]), responses[i], float(scores[i]), None if kl is None else float(kl[i]),
                   int(lengths[i]), bool(truncated[i])) for i in range(rows)]


def prompt_text(prompt) -> str:
    """A dataset prompt as one string: text as is, a conversation as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def samples_path_for(checkpoint_dir: str | Path, role: str, rank: int) -> Path:
    return Path(checkpoint_dir) / "samples" / f"{role}-{rank}.jsonl"


def write(path: Path, samples: Sequence[Sample]) -> None:
    """Append the samples as JSON lines (non-finite numbers as null, so the file stays JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for s in samples:
            row = asdict(s)
            for key in ("reward", "kl"):
                if row[key] is not None and not math.isfinite(row[key]):
                    row[key] = None
            f.write(json.dumps(row) + "\n")


def info_labels(sample: Sample) -> dict[str, str]:
    """The labels of the `rlhf_trainer_sample` info series: the newest sample, texts cut short."""
    return {"step": str(sample.step), "prompt": sample.prompt[:INFO_TEXT], "response": sample.response[:INFO_TEXT],
            "reward": f"{sample.reward:.4g}", "length": str(sample.length), "truncated": str(sample.truncated).lower()}
