"""Trainer metrics: Prometheus gauges on RLHF_METRICS_PORT and a per-step JSONL file.

Series names are those of docs/spec.md ("Metric names"); the scrape adds job / role / rank labels,
so the series carry none of their own (except the phase of `rlhf_trainer_phase_seconds` and
`rlhf_trainer_phase_peak_memory_bytes`). The JSONL
file `$RLHF_CHECKPOINT_DIR/metrics/<role>-<rank>.jsonl` gets one object per step with the same names
minus the `rlhf_trainer_` prefix; `rlhf-operator report DIR` plots it.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from rlhf_trainer.memory import PeakMemory

PREFIX = "rlhf_trainer_"
GAUGES = {
    "step": "Optimizer steps done",
    "rank": "This process's rank in its role's world: pod index x processesPerPod + local rank",
    "reward_mean": "Mean score of this step's samples",
    "reward_std": "Standard deviation of this step's scores",
    "kl": "Mean per-sequence KL(policy || reference) of this step's samples (may be negative with k1)",
    "kl_coef": "KL penalty coefficient in use",
    "policy_loss": "Policy (or DPO / RM / SFT) loss",
    "value_loss": "Critic value loss",
    "loss": "Total loss of the step",
    "clip_fraction": "Fraction of tokens whose PPO ratio was clipped",
    "entropy": "Mean per-token entropy of the policy on its samples",
    "response_length": "Mean response length in tokens",
    "tokens_per_second": "Tokens (prompt + response) processed per second over the step",
    "last_checkpoint_step": "Step of the newest checkpoint this process saved",
    "preference_accuracy": "Fraction of pairs where the chosen answer scores above the rejected",
    "kl_stderr": "Standard error of the step's mean per-sequence KL (k1 below 0 by less than 4 of these is noise)",
    "kl_negative_share": "Share of response tokens whose per-token KL term (log pi - log pi_ref) is negative",
    "response_length_change": "Mean response length of the last alarmWindow steps over the window before, minus 1",
    "distinct_2": "Mean unique-bigram share inside the responses (of 3 tokens or more): low = repetition",
    "eval_reward_mean": "Held-out prompts: mean score of the greedy answers",
    "eval_reward_mean_sampled": "Held-out prompts: mean score of answers sampled at the training temperature",
    "eval_pass_rate": "Held-out prompts: share of greedy answers scoring >= 1.0 (rule rewards)",
    "eval_preference_accuracy": "Held-out pairs: share ranked chosen above rejected",
    "eval_loss": "Held-out loss (DPO / Bradley-Terry / SFT token mean)",
    "eval_exact_match": "Held-out prompts: share of greedy answers equal to the reference (SFT)",
    "accuracy_t1": "Multi-turn rollouts: share of this step's first attempts scoring >= 1.0 (a rule's right answer)",
    "accuracy_t2": "Multi-turn rollouts: share of this step's last attempts scoring >= 1.0",
    "accuracy_delta": "Multi-turn rollouts: accuracy_t2 - accuracy_t1 (SCoRe's delta(t1, t2))",
    "wrong_to_right": "Multi-turn rollouts: share of rollouts whose first attempt is wrong and last attempt right",
    "right_to_wrong": "Multi-turn rollouts: share of rollouts whose first attempt is right and last attempt wrong",
    "score_stage": "SCoRe (selfCorrection score): the training stage of this step, 1 or 2",
    "truncated_rows": "Rows of this step cut to maxLength (dpo/rm/sft) or maxPromptLength",
    "dataset_rows": "Rows of the training dataset as read (pairs counted before identical ones are dropped)",
    "dataset_truncated_rows": "Rows of the training dataset that lose tokens to maxLength / maxPromptLength",
    "dataset_dropped_pairs": "Pairs dropped because chosen and rejected are identical after truncation",
}
PHASES = ("generate", "score", "train", "sync", "eval")
PHASE_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


class TrainerMetrics:
    """The Prometheus series and the JSONL file of one trainer process."""

    def __init__(self, jsonl_path: str | Path | None = None, memory: PeakMemory | None = None,
                 samples_path: str | Path | None = None, tracker: Any = None):
        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(PREFIX + name, doc, registry=self.registry) for name, doc in GAUGES.items()}
        self.phase_seconds = Histogram(
            PREFIX + "phase_seconds",
            "Seconds spent per phase of a step",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.memory = memory or PeakMemory()
        self.phase_peak_memory = Gauge(
            PREFIX + "phase_peak_memory_bytes",
            "Peak memory of this process during the last run of each phase: device memory allocated "
            "on GPU, resident set (VmHWM) on CPU",
            ["phase"],
            registry=self.registry,
        )
        self.non_finite = Counter(
            PREFIX + "non_finite",
            "Non-finite values skipped under hyperparameters.nonFinite: skip (batches, micro-batches or optimizer steps)",
            ["where"],
            registry=self.registry,
        )
        self.alarm = Gauge(PREFIX + "alarm", "1 while an alarm fires (rlhf_trainer.alarms), by reason", ["reason"],
                           registry=self.registry)
        self.alarms_info = Info(PREFIX + "alarms", "The alarms firing now: reason -> message", registry=self.registry)
        self.sample_info = Info(PREFIX + "sample", "The newest rollout written to samples/ (rlhf_trainer.samples)",
                                registry=self.registry)
        self.trackers_info = Info(PREFIX + "trackers", "Links to this job's experiment tracker runs: tracker -> URL "
                                  "or folder (rlhf_trainer.trackers)", registry=self.registry)
        self.tracker_links: dict[str, str] = {}
        self.samples_path = Path(samples_path) if samples_path else None
        self.tracker = tracker  # rlhf_trainer.trackers: every step's line and samples (None: none)
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None
        if self.jsonl_path:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._server = None

    def serve(self, port: int, host: str = "") -> int:
        """Start the /metrics HTTP server (port 0 = disabled); returns the port or 0."""
        if port == 0:
            return 0
        self._server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)
        return self._server.server_port

    def stop(self, failed: bool = False) -> None:
        """Close the trackers (`failed`: the process ends on an error or a stop, not done) and the server."""
        if self.tracker is not None:
            self.tracker.close(failed=failed)
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @contextmanager
    def phase(self, name: str, into: dict[str, float] | None = None):
        """Time a block as one observation of `rlhf_trainer_phase_seconds{phase=name}` and set
        `rlhf_trainer_phase_peak_memory_bytes{phase=name}` to its peak memory; `into` (the step's
        log) gets `<name>_seconds` (summed over the step) and `<name>_peak_memory_bytes` (max)."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")
        self.memory.reset()
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            peak = self.memory.peak_bytes()
            self.phase_seconds.labels(phase=name).observe(elapsed)
            self.phase_peak_memory.labels(phase=name).set(peak)
            if into is not None:
                into[f"{name}_seconds"] = into.get(f"{name}_seconds", 0.0) + elapsed
                into[f"{name}_peak_memory_bytes"] = max(into.get(f"{name}_peak_memory_bytes", 0), peak)

    def record_step(self, step: int, values: dict[str, float]) -> dict:
        """Set the gauges named in `values` and append the step's line to the JSONL file.

        Names outside GAUGES (e.g. `generate_seconds`) go to the JSONL file only. Non-finite values
        are written as null so the file stays valid JSON.
        """
        self.gauges["step"].set(step)
        for name, value in values.items():
            if name in self.gauges and isinstance(value, int | float):
                self.gauges[name].set(float(value))
        row = {"step": step, "time": time.time()}
        if self.tracker_links:  # the local runner's stand-in for the info series (status.progress.trackers)
            row["trackers"] = dict(self.tracker_links)
        for name, value in values.items():
            if isinstance(value, dict | str):  # e.g. `alarms`: reason -> message
                row[name] = value
                continue
            row[name] = float(value) if value is not None and math.isfinite(float(value)) else None
        if self.jsonl_path:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.tracker is not None:
            self.tracker.log_step(step, row)
        return row

    def count_non_finite(self, where: str) -> None:
        """One skipped non-finite value: `rlhf_trainer_non_finite_total{where}` (see finite.py)."""
        self.non_finite.labels(where=where).inc()

    def record_samples(self, picked) -> None:
        """Append rollouts to samples/<role>-<rank>.jsonl; the newest becomes the `sample` info series."""
        from rlhf_trainer import samples

        if not picked:
            return
        if self.samples_path:
            samples.write(self.samples_path, picked)
        if self.tracker is not None:
            self.tracker.log_samples(picked[0].step, picked)
        self.sample_info.info(samples.info_labels(picked[-1]))

    def set_alarms(self, alarms: dict[str, str], reasons: tuple[str, ...]) -> None:
        """Publish the alarms firing now: every reason's gauge (1 / 0) and the reason -> message series."""
        for reason in reasons:
            self.alarm.labels(reason=reason).set(1.0 if reason in alarms else 0.0)
        self.alarms_info.info({r: m[:500] for r, m in alarms.items()})

    def set_tracker_links(self, links: dict[str, str]) -> None:
        """Publish the tracker runs' links (`rlhf_trainer_trackers_info`; every metrics line carries them too)."""
        self.tracker_links = dict(links)
        self.trackers_info.info(self.tracker_links)

    def set_dataset(self, rows: int, truncated: int, dropped: int) -> None:
        """The training dataset's startup counts (rlhf_trainer.tokenized.LengthReport)."""
        self.gauges["dataset_rows"].set(rows)
        self.gauges["dataset_truncated_rows"].set(truncated)
        self.gauges["dataset_dropped_pairs"].set(dropped)

    def set_checkpoint_step(self, step: int) -> None:
        self.gauges["last_checkpoint_step"].set(step)


def jsonl_path_for(checkpoint_dir: str | Path, role: str, rank: int) -> Path:
    return Path(checkpoint_dir) / "metrics" / f"{role}-{rank}.jsonl"
