"""rlhf_trainer.trackers: which values become which TensorBoard scalars, the samples table, and real
event files read back (TFRecord framing + tensorboardX's Event proto)."""

import struct

import pytest
from rlhf_trainer.samples import Sample
from rlhf_trainer.trackers import TensorBoardTracker, samples_markdown, scalar_tag, scalars


@pytest.mark.parametrize(("name", "tag"), [
    ("reward_mean", "train/reward_mean"), ("eval_loss", "eval/loss"), ("generate_seconds", "time/generate_seconds"),
    ("train_peak_memory_bytes", "time/train_peak_memory_bytes"),
])
def test_scalar_tag(name, tag):
    assert scalar_tag(name) == tag


def test_scalars_keep_finite_numbers_only():
    row = {"step": 3, "time": 1e9, "kl": 0.5, "loss": None, "reward_mean": float("nan"), "alarms": {"A": "b"},
           "eval_exact_match": 1, "flag": True}
    assert scalars(row) == {"train/kl": 0.5, "eval/exact_match": 1.0}


def test_samples_markdown_escapes_pipes_and_newlines():
    text = samples_markdown([Sample(2, "a|b", "x\ny", 1.0, None, 3, True)])
    assert text.splitlines()[-1] == "| a\\|b | x\\ny | 1 |  | 3 | True |"


def read_events(folder):
    """Every Event of the event files under `folder` (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def test_event_files_hold_the_steps_scalars_and_the_samples(tmp_path):
    tracker = TensorBoardTracker(tmp_path / "tensorboard" / "actor-0")
    for step in (1, 2):
        tracker.log_step(step, {"step": step, "reward_mean": step / 10, "eval_loss": 1.0 / step})
    tracker.log_samples(2, [Sample(2, "1+1=", "2", 1.0, 0.1, 2, False)])
    tracker.close()
    events = read_events(tmp_path / "tensorboard" / "actor-0")
    values = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
    assert values[("train/reward_mean", 2)] == pytest.approx(0.2)
    assert values[("eval/loss", 1)] == pytest.approx(1.0)
    texts = [v for e in events for v in e.summary.value if v.tag.startswith("samples")]
    assert texts and b"1+1=" in texts[0].tensor.string_val[0]


def test_nothing_is_written_before_the_first_step(tmp_path):
    TensorBoardTracker(tmp_path / "tb").close()
    assert not (tmp_path / "tb").exists()
