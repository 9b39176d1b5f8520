"""The chart's Prometheus alert rules (charts/rlhf-operator/rules/): promtool's own checks and rule unit
tests (tests/prometheus/), the PrometheusRule the chart renders from the same file, and the names the
rules use against what the trainer exports."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from rlhf_trainer.alarms import REASONS
from rlhf_trainer.metrics import TrainerMetrics
from test_chart import MONITORING_API, one, render, render_raw

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "rlhf-operator" / "rules" / "rlhf-alerts.yaml"
RULE_TESTS = REPO / "tests" / "prometheus" / "rlhf-alerts.test.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: scripts/install.sh installs it (Debian's prometheus package)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rule_file():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_promtool_rule_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails_the_rule_tests(tmp_path):
    """The unit tests can fail: the same file expecting no NegativeKL alert at 8m does."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(RULES)]
    case = next(c for c in tests["tests"][0]["alert_rule_test"]
                if c["alertname"] == "RLHFNegativeKL" and c["eval_time"] == "8m")
    case["exp_alerts"] = []
    broken = tmp_path / "broken.test.yaml"
    broken.write_text(yaml.safe_dump(tests))
    assert promtool("test", "rules", str(broken)).returncode != 0


def test_every_trainer_alarm_has_an_alert_and_every_series_is_exported():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = [rule["expr"] for group in groups for rule in group["rules"]]
    reasons = {m for e in exprs for m in re.findall(r'reason="([A-Za-z]+)"', e)}
    assert reasons == set(REASONS)
    families = {f.name for f in TrainerMetrics().registry.collect()}
    used = {n.removesuffix("_total") for e in exprs for n in re.findall(r"\brlhf_trainer_[a-z_]+", e)}
    assert used <= families, used - families


def test_the_chart_ships_the_same_rules_off_by_default():
    kinds = {d["kind"] for d in render(api_versions=(MONITORING_API,))}
    assert "PrometheusRule" not in kinds
    docs = render("metrics.prometheusRule.enabled=true", "metrics.labels.release=kube-prometheus-stack",
                  api_versions=(MONITORING_API,))
    rule = one(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    result = render_raw("metrics.prometheusRule.enabled=true")
    assert result.returncode != 0 and "metrics.prometheusRule.enabled=true needs the Prometheus Operator" in result.stderr
