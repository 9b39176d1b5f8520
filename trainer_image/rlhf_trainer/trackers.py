"""Experiment trackers: TensorBoard event files on the checkpoint volume, next to metrics/ and samples/.

    $RLHF_CHECKPOINT_DIR/tensorboard/<role>-<rank>/events.out.tfevents.*
    tensorboard --logdir <checkpoint volume>/tensorboard

Every numeric value of a step's metrics line becomes a scalar (`train/<name>`, held-out metrics
`eval/<name without eval_>`, phase timings `time/<name>`) at that step, and each batch of samples a
text table (`samples`), as TRL's `report_to="tensorboard"` logs them. The writer is tensorboardX
(maintained, writes the same event files as TensorFlow's without TensorFlow or the tensorboard
server package); it is created on the first step, so processes that record none (the serving
roles) leave no empty folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Keys of a metrics line that are not curves.
NOT_SCALARS = ("step", "time")


def scalar_tag(name: str) -> str:
    """`eval_loss` -> `eval/loss`, `generate_seconds` -> `time/generate_seconds`, `kl` -> `train/kl`."""
    if name.startswith("eval_"):
        return "eval/" + name.removeprefix("eval_")
    if name.endswith("_seconds") or name.endswith("_peak_memory_bytes"):
        return "time/" + name
    return "train/" + name


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line by tag (None, NaN, text and dicts are left out)."""
    out = {}
    for name, value in row.items():
        if name in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[scalar_tag(name)] = float(value)
    return out


def samples_markdown(samples: Sequence[Any]) -> str:
    """A markdown table of rollouts (rlhf_trainer.samples.Sample) for TensorBoard's text panel."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "\\n")

    lines = ["| prompt | response | reward | kl | length | truncated |", "|---|---|---|---|---|---|"]
    for s in samples:
        kl = "" if s.kl is None else f"{s.kl:.4g}"
        lines.append(f"| {cell(s.prompt)} | {cell(s.response)} | {s.reward:.4g} | {kl} | {s.length} | {s.truncated} |")
    return "\n".join(lines)


class TensorBoardTracker:
    """Scalars and sample tables of one trainer process under `logdir`."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self._writer = None

    def _open(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=10)
        return self._writer

    def log_step(self, step: int, row: Mapping[str, Any]) -> None:
        writer = self._open()
        for tag, value in scalars(row).items():
            writer.add_scalar(tag, value, global_step=step)

    def log_samples(self, step: int, samples: Sequence[Any]) -> None:
        self._open().add_text("samples", samples_markdown(samples), global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tensorboard_dir_for(checkpoint_dir: str | Path, role: str, rank: int) -> Path:
    return Path(checkpoint_dir) / "tensorboard" / f"{role}-{rank}"
