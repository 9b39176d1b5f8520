"""Training progress from the trainer's /metrics text (docs/spec.md "Progress without API write access").

Pure: text in, dict out. The kube shell fetches the text from the actor rank-0 pod; trainer pods
never write to the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# status.progress key <- trainer series name, and the type the status stores.
PROGRESS_SERIES: dict[str, tuple[str, type]] = {
    "step": ("rlhf_trainer_step", int),
    "rewardMean": ("rlhf_trainer_reward_mean", float),
    "kl": ("rlhf_trainer_kl", float),
    "lastCheckpointStep": ("rlhf_trainer_last_checkpoint_step", int),
}


# The trainer's newest sample (rlhf_trainer.samples), an info series; status.progress.lastSample.
SAMPLE_SERIES = "rlhf_trainer_sample_info"
# The trainer's alarms firing now (rlhf_trainer.alarms), an info series: reason -> message labels.
ALARMS_SERIES = "rlhf_trainer_alarms_info"
# Links to the job's tracker runs (rlhf_trainer.trackers), an info series: tracker -> URL; status.progress.trackers.
TRACKERS_SERIES = "rlhf_trainer_trackers_info"
# Characters of status.progress.lastSample (`kubectl describe` shows it on one line).
SAMPLE_CHARS = 160


def format_sample(sample: Mapping[str, Any]) -> str:
    """`step 10: '2+2=' -> '4' (reward 1, 2 tokens)`, cut to SAMPLE_CHARS; truncated responses say so.

    Takes a samples JSONL row or the info series' labels (the same keys, values as strings there).
    """
    reward = sample.get("reward")
    try:
        reward = f"{float(reward):.3g}"
    except (TypeError, ValueError):
        reward = "n/a"
    truncated = str(sample.get("truncated", "")).lower() == "true"
    tail = f" (reward {reward}, {sample.get('length', '?')} tokens{', truncated' if truncated else ''})"
    text = f"step {sample.get('step', '?')}: {str(sample.get('prompt', ''))!r} -> {str(sample.get('response', ''))!r}"
    room = SAMPLE_CHARS - len(tail)
    return (text if len(text) <= room else text[:room - 3] + "...") + tail


def parse_progress(metrics_text: str) -> dict[str, Any]:
    """{step, rewardMean, kl, lastCheckpointStep, lastSample, alarms, trackers} found in a Prometheus text exposition.

    Series that are absent (e.g. no checkpoint yet) or NaN are left out. When a series has several
    samples (label sets), the largest value is taken: every label set of a rank-0 process counts the
    same steps. Malformed text raises ValueError.
    """
    values: dict[str, float] = {}
    newest_sample: dict[str, str] | None = None
    alarms: dict[str, str] | None = None
    trackers: dict[str, str] = {}
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name == SAMPLE_SERIES:
                    newest_sample = dict(sample.labels)
                    continue
                if sample.name == ALARMS_SERIES:
                    alarms = dict(sample.labels)
                    continue
                if sample.name == TRACKERS_SERIES:
                    trackers = dict(sample.labels)
                    continue
                if sample.value != sample.value:  # NaN: the trainer has not set it yet
                    continue
                if sample.name not in values or sample.value > values[sample.name]:
                    values[sample.name] = sample.value
    except (ValueError, TypeError, IndexError) as err:
        raise ValueError(f"trainer /metrics is not Prometheus text: {err}") from err
    progress: dict[str, Any] = {}
    for key, (series, kind) in PROGRESS_SERIES.items():
        if series in values:
            progress[key] = kind(values[series])
    if newest_sample and newest_sample.get("step"):
        progress["lastSample"] = format_sample(newest_sample)
    if alarms is not None:  # present (maybe empty: none firing) only for online algorithms
        progress["alarms"] = alarms
    if trackers:
        progress["trackers"] = trackers
    return progress


def merge_progress(previous: dict[str, Any] | None, scraped: dict[str, Any] | None, now: str) -> dict[str, Any] | None:
    """status.progress for this pass: the scraped values with updatedAt moved only when a value changed.

    Keeping updatedAt still while nothing moved keeps the status identical between passes, so an idle
    job costs no status write (and no watch event that would trigger yet another pass).
    No scrape (pod not running, endpoint down) keeps the previous progress.
    """
    if not scraped:
        return dict(previous) if previous else None
    old_values = {k: v for k, v in (previous or {}).items() if k != "updatedAt"}
    merged = {**old_values, **scraped}
    if previous and merged == old_values and "updatedAt" in previous:
        return {**merged, "updatedAt": previous["updatedAt"]}
    return {**merged, "updatedAt": now}
