"""The Grafana dashboard (charts/rlhf-operator/dashboards/rlhf-operator.json).

Every PromQL expression may only name series the code exports: the names come from the metric
registries of rlhf_operator.metrics and rlhf_trainer.metrics, expanded the way Prometheus exposes
them (counters as _total, histograms as _bucket/_sum/_count).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from rlhf_operator.metrics import OperatorMetrics
from rlhf_trainer.metrics import TrainerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "rlhf-operator" / "dashboards" / "rlhf-operator.json"
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                   "summary": ("_sum", "_count", ""), "info": ("_info",)}
# A series name: the project's prefix, then name characters (PromQL functions never start with it).
SERIES_NAME = re.compile(r"\brlhf_[a-zA-Z0-9_:]*")
VARIABLE = re.compile(r"\$(?:\{)?([a-zA-Z_][a-zA-Z0-9_]*)")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__all", "__auto"}


def exposed_names(registry: CollectorRegistry) -> dict[str, str]:
    """Series name as scraped -> metric type, for every family in the registry."""
    names = {}
    for family in registry.collect():
        for suffix in SERIES_SUFFIXES[family.type]:
            names[family.name + suffix] = family.type
    return names


@pytest.fixture(scope="module")
def exported() -> dict[str, str]:
    return {**exposed_names(OperatorMetrics().registry), **exposed_names(TrainerMetrics().registry)}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every query: panel targets and template variables."""
    found = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", query))
    return found


def test_registries_expose_the_documented_families(exported):
    # Guards the name collection itself: suffixes as Prometheus scrapes them.
    assert exported["rlhf_operator_jobs_failed_total"] == "counter"
    assert exported["rlhf_operator_reconcile_duration_seconds_bucket"] == "histogram"
    assert exported["rlhf_trainer_phase_seconds_count"] == "histogram"
    assert exported["rlhf_trainer_reward_mean"] == "gauge"
    assert exported["rlhf_trainer_sample_info"] == "info"
    assert "rlhf_operator_jobs_failed" not in exported


def test_every_promql_expression_names_only_exported_series(dashboard, exported):
    used = set()
    for where, expr in expressions(dashboard):
        names = set(SERIES_NAME.findall(expr))
        assert names, f"{where}: {expr!r} queries no rlhf series"
        unknown = names - set(exported)
        assert not unknown, f"{where}: {sorted(unknown)} not exported by rlhf_operator.metrics / rlhf_trainer.metrics"
        used |= names
    # The two audiences' panels: each of these must be on the dashboard.
    required = {
        "rlhf_trainer_step", "rlhf_trainer_reward_mean", "rlhf_trainer_reward_std", "rlhf_trainer_kl",
        "rlhf_trainer_kl_coef", "rlhf_trainer_policy_loss", "rlhf_trainer_value_loss",
        "rlhf_trainer_tokens_per_second", "rlhf_trainer_last_checkpoint_step",
        "rlhf_trainer_phase_seconds_sum", "rlhf_trainer_phase_seconds_count", "rlhf_operator_job_restarts",
        "rlhf_operator_jobs", "rlhf_operator_reconcile_duration_seconds_bucket",
        "rlhf_operator_time_to_running_seconds_bucket", "rlhf_operator_restart_latency_seconds_bucket",
        "rlhf_operator_jobs_restarts_total", "rlhf_operator_jobs_failed_total",
    }
    assert required <= used, f"missing from the dashboard: {sorted(required - used)}"


def test_histogram_quantiles_use_buckets_and_keep_le(dashboard, exported):
    for where, expr in expressions(dashboard):
        if "histogram_quantile" not in expr:
            continue
        names = SERIES_NAME.findall(expr)
        assert names and all(n.endswith("_bucket") and exported[n] == "histogram" for n in names), (where, expr)
        by = re.search(r"by \(([^)]*)\)", expr)
        assert by and "le" in [label.strip() for label in by.group(1).split(",")], (where, expr)


def test_counters_are_only_read_through_rate_or_increase(dashboard, exported):
    for where, expr in expressions(dashboard):
        for name in SERIES_NAME.findall(expr):
            if exported[name] == "counter" or name.endswith(("_sum", "_count", "_bucket")):
                assert re.search(rf"(rate|increase)\(\s*{name}\b", expr), (where, name)


def test_template_variables_and_their_use(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "job"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for where, expr in expressions(dashboard):
        for name in VARIABLE.findall(expr):
            assert name in variables or name in GRAFANA_BUILTINS, f"{where}: undefined ${name}"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_trainer_panels_filter_by_namespace_and_job(dashboard):
    for panel in panels(dashboard):
        where = panel["title"]
        for expr in (t["expr"] for t in panel["targets"]):
            if "rlhf_trainer_" in expr or "rlhf_operator_job_" in expr:
                assert 'namespace=~"$namespace"' in expr and 'job=~"$job"' in expr, (where, expr)


def test_rows_for_the_ml_engineer_and_the_platform_engineer(dashboard):
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) == 2 and rows[0].startswith("ML engineer") and rows[1].startswith("Platform engineer")
    # The ML row holds the trainer panels, the platform row the operator-wide ones.
    current, by_row = None, {}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            continue
        by_row.setdefault(current, []).append(" ".join(t["expr"] for t in panel["targets"]))
    assert all("rlhf_trainer_" in e or "rlhf_operator_job_" in e for e in by_row[rows[0]])
    assert all("rlhf_trainer_" not in e for e in by_row[rows[1]])


def test_panels_have_unique_ids_and_do_not_overlap(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    assert dashboard["uid"] == "rlhf-operator"
