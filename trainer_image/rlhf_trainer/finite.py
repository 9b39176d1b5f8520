"""Non-finite guards: a NaN or infinite reward, loss or gradient norm is caught where it first appears.

`hyperparameters.non_finite` decides what happens then:
- `fail` (default): NonFiniteError, a DataError, so the process exits 65 (permanent: a restart from
  the last checkpoint would draw the same samples and meet the same value) with a message naming
  the step, where the value appeared, its source (the reward function or model, the role) and the
  rows (dataset source, prompt, response);
- `skip`: the value never reaches the weights and `rlhf_trainer_non_finite_total{where}` counts it.

| where      | checked                                                 | `skip` drops                          |
|------------|---------------------------------------------------------|---------------------------------------|
| reward     | a rollout's scores, right after scoring                 | the whole batch (every actor rank)    |
| experience | log-probs, values, advantages of a rollout (pre-update) | the whole batch (every actor rank)    |
| loss       | each micro-batch loss, before backward                  | that micro-batch's gradient           |
| grad_norm  | the global gradient norm at each optimizer step         | that optimizer step                   |

A non-finite gradient never updates the weights under either policy: DeepSpeed's ZeRO 1-3
optimizers skip a step whose gradient norm is not finite, and `DeepSpeedStrategy.step()` drops the
gradients itself at ZeRO-0 (see strategy.py). `fail` then raises; `skip` counts and goes on.
TRL / OpenRLHF have no such guard (a NaN reward silently turns every loss NaN); the row-level
message follows the project's DataError style (`file:line: ...`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhf_trainer.errors import DataError

POLICIES = ("fail", "skip")
WHERE = ("reward", "experience", "loss", "grad_norm")
# Rows named in a message (the count of the others follows).
ROWS_SHOWN = 3
TEXT_SHOWN = 60


class NonFiniteError(DataError):
    """A NaN or inf reached a reward, loss or gradient norm under `non_finite: fail` (exit 65)."""

    kind = "non-finite value"


def non_finite_rows(values: torch.Tensor) -> list[int]:
    """Indices of the rows of a (B,) or (B, ...) tensor that hold a NaN or an infinity."""
    bad = ~torch.isfinite(values.detach())
    if bad.dim() > 1:
        bad = bad.flatten(1).any(dim=1)
    return [int(i) for i in torch.nonzero(bad).flatten()]


def _short(text: str) -> str:
    return repr(text if len(text) <= TEXT_SHOWN else text[:TEXT_SHOWN] + "...")


def describe_rows(rows: Sequence[int], records: Sequence[Any], *, responses: Sequence[str] | None = None,
                  values: torch.Tensor | None = None) -> str:
    """"row 0 (train.jsonl:7, prompt '2+2=', response '4': nan)" for the first few rows, "+N more"."""
    parts = []
    for i in rows[:ROWS_SHOWN]:
        record = records[i] if i < len(records) else None
        bits = []
        if record is not None and getattr(record, "source", ""):
            bits.append(record.source)
        text = getattr(record, "prompt", None)  # the prompt's text (token rows of pairs / sft have none)
        if isinstance(text, str):
            bits.append(f"prompt {_short(text)}")
        elif isinstance(text, list):  # a conversation: its last message
            bits.append(f"prompt {_short(str(text[-1].get('content', '')) if text else '')}")
        if responses is not None and i < len(responses):
            bits.append(f"response {_short(responses[i])}")
        text = f"row {i}" + (f" ({', '.join(bits)})" if bits else "")
        if values is not None and values.dim() == 1:
            text += f": {float(values[i])}"
        parts.append(text)
    if len(rows) > ROWS_SHOWN:
        parts.append(f"+{len(rows) - ROWS_SHOWN} more")
    return "; ".join(parts)


class NonFiniteGuard:
    """One process's checks: `policy` from hyperparameters.non_finite, `step` set by the step driver.

    `reduce` sums a number over the role's world (distributed.all_reduce_sum), so every rank takes
    the same batch-level decision; `count(where)` is called once per skipped value (the metric).
    """

    def __init__(self, policy: str, *, reduce: Callable[[float], float] = float,
                 count: Callable[[str], None] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"hyperparameters.non_finite: {policy!r} is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self.step = 0
        self.reduce = reduce
        self.skipped: Counter[str] = Counter()
        self.updates: Counter[str] = Counter()  # optimizer steps applied, by role
        self._contributed: Counter[str] = Counter()  # finite micro-batches since the last boundary
        self._count = count

    def _skip(self, where: str) -> None:
        self.skipped[where] += 1
        if self._count is not None:
            self._count(where)

    def _fail(self, where: str, message: str) -> None:
        hint = "" if self.policy == "skip" else " (hyperparameters.nonFinite: skip drops such batches instead)"
        raise NonFiniteError(f"step {self.step}: non-finite {where}: {message}{hint}")

    def batch_ok(self, where: str, tensors: dict[str, torch.Tensor | None], records: Sequence[Any], *,
                 source: str, responses: Sequence[str] | None = None) -> bool:
        """True when every row of every (B, ...) tensor is finite on every rank of the world.

        Collective: every rank must call it at the same point. Under `fail` raises NonFiniteError
        naming this rank's bad rows (or "another rank" when only others had some); under `skip`
        returns False on every rank and counts the batch once per rank.
        """
        found = {name: non_finite_rows(t) for name, t in tensors.items() if t is not None}
        found = {name: rows for name, rows in found.items() if rows}
        if self.reduce(float(sum(len(rows) for rows in found.values()))) == 0:
            return True
        if self.policy == "skip":
            self._skip(where)
            return False
        if not found:
            self._fail(where, f"from {source} on another rank of this role (this rank's rows are finite)")
        name, rows = next(iter(found.items()))
        tensor = tensors[name]
        shown = describe_rows(rows, records, responses=responses, values=tensor if tensor.dim() == 1 else None)
        total = tensor.shape[0]
        self._fail(where, f"{name} from {source}: {len(rows)} of {total} rows: {shown}")
        return False  # not reached

    def loss_ok(self, loss: torch.Tensor, *, source: str, records: Sequence[Any] = ()) -> bool:
        """True when a micro-batch loss is finite. Local (no collective): `skip` -> False, counted."""
        if bool(torch.isfinite(loss.detach()).all()):
            return True
        if self.policy == "skip":
            self._skip("loss")
            return False
        rows = describe_rows(range(len(records)), records) if records else "no rows"
        self._fail("loss", f"{source} is {float(loss.detach())} on a micro-batch of {len(records)} rows: {rows}")
        return False

    def grad_norm_ok(self, grad_norm: float | None, *, applied: bool, source: str) -> bool:
        """After an optimizer step: True when its gradient norm was finite and the step was applied.

        DeepSpeed reports a skipped (overflow) step with an infinite norm; a step skipped with no
        norm at all (`grad_norm` None, `applied` False) counts as non-finite too.
        """
        finite = grad_norm is None or math.isfinite(grad_norm)
        if finite and applied:
            return True
        if self.policy == "skip":
            self._skip("grad_norm")
            return False
        self._fail("grad_norm", f"{source}: the gradient norm is {grad_norm} (the optimizer step was not applied, "
                                "the weights keep their last finite values)")
        return False

    def backward_step(self, strategy, loss: torch.Tensor, *, anchor: torch.Tensor, role: str, source: str,
                      records: Sequence[Any] = ()) -> float | None:
        """One micro-batch of `role`'s strategy through the guard: backward, step, check the step.

        A non-finite loss is replaced by a zero with the same graph (`skip`) so DeepSpeed's
        micro-batch count stays in step; at the accumulation boundary the step's gradient norm is
        checked. Returns the loss value, or None when this micro-batch was skipped.
        """
        ok = self.loss_ok(loss, source=source, records=records)
        strategy.backward(loss if ok else zero_loss_like(anchor))
        self._contributed[role] += int(ok)
        outcome = strategy.step()
        if outcome is not None:
            finite = self.grad_norm_ok(outcome.grad_norm, applied=outcome.applied, source=f"{role} gradients")
            if finite and self._contributed[role]:
                self.updates[role] += 1
            self._contributed[role] = 0
        return float(loss.detach()) if ok else None

    def check_updated(self, role: str, steps_run: int) -> None:
        """At the end of a run: `role` took at least one real optimizer step if any step ran.

        Under `skip`, a job whose every step was skipped would otherwise export its initial weights
        and succeed; this makes it fail (exit 65) instead.
        """
        if steps_run > 0 and self.updates[role] == 0:
            raise NonFiniteError(
                f"all {steps_run} steps of this run were skipped for non-finite values "
                f"(skipped: {dict(self.skipped)}): the {role}'s weights were never updated"
            )


def zero_loss_like(anchor: torch.Tensor) -> torch.Tensor:
    """A zero with a graph through `anchor`, for backward() in place of a skipped micro-batch's loss.

    DeepSpeed counts micro-batches to find the accumulation boundary (and ZeRO reduces gradients in
    backward hooks), so a skipped micro-batch still needs a backward. nan_to_num's gradient is zero
    at non-finite entries, so the gradient this sends into the model is exactly zero.
    """
    return torch.nan_to_num(anchor.float(), nan=0.0, posinf=0.0, neginf=0.0).sum() * 0.0
