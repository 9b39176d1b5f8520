"""Trainer metrics: spec'd series names, JSONL lines per step, the HTTP endpoint."""

import json
import re
import urllib.request
from pathlib import Path

import pytest
from rlhf_operator.localexec import free_port
from rlhf_trainer.memory import PeakMemory, parse_vm_hwm
from rlhf_trainer.metrics import PREFIX, TrainerMetrics, jsonl_path_for

SPEC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"


def _spec_trainer_names() -> set[str]:
    text = SPEC.read_text()
    section = text[text.index("Trainer (`rlhf_trainer.metrics`") :]
    # A counter `x_total` and an info series `x_info` are collected as the family `x`.
    names = re.findall(r"`(rlhf_trainer_[a-z0-9_]+)", section)
    return {name.removesuffix("_total").removesuffix("_info") for name in names}


def test_every_spec_metric_exists():
    metrics = TrainerMetrics()
    exposed = {m.name for m in metrics.registry.collect()}
    spec_names = _spec_trainer_names()
    assert spec_names, "no trainer metric names found in docs/spec.md"
    assert spec_names <= exposed, spec_names - exposed


def test_record_step_sets_gauges_and_appends_jsonl(tmp_path):
    path = jsonl_path_for(tmp_path, "actor", 0)
    metrics = TrainerMetrics(path)
    metrics.record_step(1, {"reward_mean": 0.25, "kl": -0.01, "generate_seconds": 0.5})
    metrics.record_step(2, {"reward_mean": 0.75, "loss": float("nan")})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == -0.01 and rows[0]["generate_seconds"] == 0.5
    assert rows[1]["loss"] is None  # NaN is not JSON
    assert metrics.registry.get_sample_value(PREFIX + "reward_mean") == 0.75
    assert metrics.registry.get_sample_value(PREFIX + "step") == 2


def test_phase_histogram_and_unknown_phase():
    metrics = TrainerMetrics()
    timings = {}
    with metrics.phase("generate", timings):
        pass
    assert metrics.registry.get_sample_value(PREFIX + "phase_seconds_count", {"phase": "generate"}) == 1
    assert timings["generate_seconds"] >= 0
    with pytest.raises(ValueError, match="unknown phase"):
        with metrics.phase("nap"):
            pass


class ScriptedPeaks:
    """A memory probe whose peaks are given in order (one per phase)."""

    def __init__(self, *peaks):
        self.peaks, self.resets = list(peaks), 0

    def reset(self):
        self.resets += 1

    def peak_bytes(self):
        return self.peaks.pop(0)


def test_each_phase_reports_its_peak_memory_to_the_gauge_and_the_step_log():
    metrics = TrainerMetrics(memory=ScriptedPeaks(100, 300, 200))
    timings = {}
    with metrics.phase("generate", timings):
        pass
    with metrics.phase("train", timings):
        pass
    with metrics.phase("train", timings):  # a phase run twice in a step: the step log keeps the max
        pass
    assert metrics.memory.resets == 3  # every phase starts from a fresh peak
    assert metrics.registry.get_sample_value(PREFIX + "phase_peak_memory_bytes", {"phase": "generate"}) == 100
    assert metrics.registry.get_sample_value(PREFIX + "phase_peak_memory_bytes", {"phase": "train"}) == 200
    assert timings["generate_peak_memory_bytes"] == 100 and timings["train_peak_memory_bytes"] == 300


def test_cpu_peak_memory_sees_an_allocation_inside_the_phase():
    probe = PeakMemory()
    metrics = TrainerMetrics(memory=probe)
    rss = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    before = int(rss.group(1)) * 1024
    with metrics.phase("train"):
        block = b"\x01" * (64 << 20)  # 64 MiB, every page written
    del block
    peak = metrics.registry.get_sample_value(PREFIX + "phase_peak_memory_bytes", {"phase": "train"})
    assert probe.kind == "rss"
    assert peak >= before + (60 << 20)


@pytest.mark.parametrize("status, expected", [
    ("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   2048 kB\nVmRSS:\t 1024 kB\n", 2048 * 1024),
    ("VmHWM: 1 kB", 1024),
])
def test_parse_vm_hwm(status, expected):
    assert parse_vm_hwm(status) == expected


def test_parse_vm_hwm_without_the_line_says_so():
    with pytest.raises(ValueError, match="VmHWM"):
        parse_vm_hwm("Name: python\n")


def test_http_endpoint_serves_series():
    metrics = TrainerMetrics()
    assert metrics.serve(0) == 0  # disabled
    port = metrics.serve(free_port(), "127.0.0.1")
    try:
        metrics.set_checkpoint_step(4)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "rlhf_trainer_last_checkpoint_step 4.0" in body
    finally:
        metrics.stop()


def test_non_finite_counter_by_where():
    metrics = TrainerMetrics()
    metrics.count_non_finite("reward")
    metrics.count_non_finite("reward")
    metrics.count_non_finite("grad_norm")
    get = metrics.registry.get_sample_value
    assert get("rlhf_trainer_non_finite_total", {"where": "reward"}) == 2.0
    assert get("rlhf_trainer_non_finite_total", {"where": "grad_norm"}) == 1.0
