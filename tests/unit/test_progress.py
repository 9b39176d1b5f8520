"""parse_progress / merge_progress: trainer /metrics text -> status.progress."""

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from rlhf_operator.progress import merge_progress, parse_progress


def trainer_exposition(**values: float) -> str:
    """Render real Prometheus text the way the trainer's registry would (plus unrelated series)."""
    registry = CollectorRegistry()
    for name, value in values.items():
        Gauge(f"rlhf_trainer_{name}", name, ["job", "role", "rank"], registry=registry).labels(
            job="j", role="actor", rank="0").set(value)
    Histogram("rlhf_trainer_phase_seconds", "phases", ["phase"], registry=registry).labels(phase="train").observe(0.2)
    return generate_latest(registry).decode()


def test_reads_the_four_progress_series_with_their_types():
    text = trainer_exposition(step=7, reward_mean=0.25, kl=-0.01, last_checkpoint_step=5, entropy=1.5)
    progress = parse_progress(text)
    assert progress == {"step": 7, "rewardMean": 0.25, "kl": -0.01, "lastCheckpointStep": 5}
    assert isinstance(progress["step"], int) and isinstance(progress["lastCheckpointStep"], int)


def test_absent_and_nan_series_are_left_out():
    text = trainer_exposition(step=3, reward_mean=float("nan"))
    assert parse_progress(text) == {"step": 3}


def test_no_trainer_series_gives_an_empty_dict():
    assert parse_progress("# HELP up x\n# TYPE up gauge\nup 1\n") == {}


def test_several_label_sets_take_the_largest_value():
    text = ('rlhf_trainer_step{rank="0"} 4\n'
            'rlhf_trainer_step{rank="1"} 6\n')
    assert parse_progress(text) == {"step": 6}


def test_malformed_text_raises_value_error():
    with pytest.raises(ValueError, match="Prometheus"):
        parse_progress('rlhf_trainer_step{rank="0" 4\n')


NOW, LATER = "2026-01-01T00:00:10Z", "2026-01-01T00:00:20Z"


@pytest.mark.parametrize(
    ("previous", "scraped", "expected"),
    [
        pytest.param(None, None, None, id="nothing-yet"),
        pytest.param(None, {"step": 1}, {"step": 1, "updatedAt": LATER}, id="first-scrape"),
        pytest.param({"step": 1, "updatedAt": NOW}, {"step": 1}, {"step": 1, "updatedAt": NOW},
                     id="unchanged-keeps-updatedAt"),
        pytest.param({"step": 1, "updatedAt": NOW}, {"step": 2}, {"step": 2, "updatedAt": LATER},
                     id="moved-updates-updatedAt"),
        pytest.param({"step": 1, "kl": 0.1, "updatedAt": NOW}, None, {"step": 1, "kl": 0.1, "updatedAt": NOW},
                     id="failed-scrape-keeps-previous"),
        pytest.param({"step": 4, "lastCheckpointStep": 2, "updatedAt": NOW}, {"step": 5},
                     {"step": 5, "lastCheckpointStep": 2, "updatedAt": LATER}, id="partial-scrape-keeps-other-keys"),
    ],
)
def test_merge_progress(previous, scraped, expected):
    assert merge_progress(previous, scraped, LATER) == expected


def test_the_newest_sample_becomes_a_short_last_sample():
    from prometheus_client import Info

    registry = CollectorRegistry()
    Gauge("rlhf_trainer_step", "s", registry=registry).set(10)
    Info("rlhf_trainer_sample", "newest sample", registry=registry).info(
        {"step": "10", "prompt": "2+2=", "response": "4", "reward": "1", "length": "2", "truncated": "false"})
    progress = parse_progress(generate_latest(registry).decode())
    assert progress == {"step": 10, "lastSample": "step 10: '2+2=' -> '4' (reward 1, 2 tokens)"}


@pytest.mark.parametrize(("sample", "expected"), [
    pytest.param({"step": 3, "prompt": "1+1=", "response": "22222", "reward": -0.5, "length": 5, "truncated": True},
                 "step 3: '1+1=' -> '22222' (reward -0.5, 5 tokens, truncated)", id="a JSONL row, truncated"),
    pytest.param({"step": 3, "prompt": "p", "response": "r", "reward": None, "length": 1, "truncated": False},
                 "step 3: 'p' -> 'r' (reward n/a, 1 tokens)", id="a non-finite reward was written as null"),
])
def test_format_sample(sample, expected):
    from rlhf_operator.progress import format_sample

    assert format_sample(sample) == expected


def test_format_sample_cuts_long_text_but_keeps_the_numbers():
    from rlhf_operator.progress import SAMPLE_CHARS, format_sample

    text = format_sample({"step": 1, "prompt": "x" * 500, "response": "y" * 500, "reward": 0.25, "length": 16,
                          "truncated": True})
    assert len(text) == SAMPLE_CHARS and text.endswith("... (reward 0.25, 16 tokens, truncated)")


def test_the_alarms_info_series_becomes_progress_alarms_even_when_empty():
    from prometheus_client import Info

    registry = CollectorRegistry()
    info = Info("rlhf_trainer_alarms", "alarms", registry=registry)
    info.info({"NegativeKL": "mean KL -0.2 < -0.05"})
    assert parse_progress(generate_latest(registry).decode()) == {"alarms": {"NegativeKL": "mean KL -0.2 < -0.05"}}
    info.info({})
    assert parse_progress(generate_latest(registry).decode()) == {"alarms": {}}


def test_the_trackers_info_series_becomes_progress_trackers():
    from prometheus_client import Info

    registry = CollectorRegistry()
    Info("rlhf_trainer_trackers", "links", registry=registry).info(
        {"wandb": "https://wandb.ai/team/rlhf/runs/abc", "mlflow": "file:///checkpoints/mlruns/1/r"})
    assert parse_progress(generate_latest(registry).decode()) == {
        "trackers": {"wandb": "https://wandb.ai/team/rlhf/runs/abc", "mlflow": "file:///checkpoints/mlruns/1/r"}}


def test_no_tracker_run_leaves_progress_trackers_out():
    from prometheus_client import Info

    registry = CollectorRegistry()
    Info("rlhf_trainer_trackers", "links", registry=registry)  # declared, never set: no tracker enabled
    assert "trackers" not in parse_progress(generate_latest(registry).decode())
