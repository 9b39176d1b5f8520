"""A real Prometheus scrapes a tiny PPO job's trainer pods and the operator with the relabelling of the
chart's PodMonitor and ServiceMonitor (e2e/prometheus_support.py); then every query of the Grafana
dashboard returns data over the run, and every alert rule of the chart evaluates without error. The
job also logs to W&B (offline, its key from a Secret) and MLflow: their links reach the status."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import yaml
from e2e_support import NAMESPACE, REAL, example, unique
from prometheus_support import (
    PROMETHEUS,
    Prometheus,
    pod_target_groups,
    podmonitor_scrape_configs,
    servicemonitor_scrape_config,
)

from tests.controlplane import kube

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "rlhf-operator"
DASHBOARD = CHART / "dashboards" / "rlhf-operator.json"
RULES = CHART / "rules" / "rlhf-alerts.yaml"
MONITORING_API = "monitoring.coreos.com/v1"
# Panel queries that may have no series in a tiny PPO run that fails nothing, and why. The operator
# process is shared by the e2e session: after test_e2e_faults.py has failed jobs, they have data too.
NO_DATA_IN_A_TINY_RUN = {
    "sum by (reason) (increase(rlhf_operator_jobs_failed_total[$__range]))":
        "no job fails here (rlhf_operator_jobs_failed_total{reason} has a series per failure reason once one "
        "fails; test_e2e_faults.py fails jobs)",
}

pytestmark = [
    pytest.mark.skipif(REAL, reason="the stand-in kubelet's loopback pod IPs are what Prometheus scrapes"),
    pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary: apt-get install prometheus"),
]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title or variable, PromQL) of every panel target and query variable of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    panels = [q for p in board["panels"] for q in (p.get("panels", []) if p["type"] == "row" else [p])]
    found = [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)  # Grafana's, not PromQL: its selector
            found.append((f"variable {var['name']}", inner.group(1) if inner else query))
    return found


def grafana_substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace $name / ${name} by the value Grafana would send for this selection."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], expr)


def rendered_monitors(cluster) -> tuple[dict, dict, dict]:
    """The PodMonitor, ServiceMonitor and metrics Service of the e2e release, monitors switched on."""
    release = cluster.release
    out = kube.helm(cluster.cp, "template", release.name, str(CHART), "--namespace", release.namespace,
                    "--set", f"watchNamespaces={{{NAMESPACE}}}", "--set", "metrics.podMonitor.enabled=true",
                    "--set", "metrics.serviceMonitor.enabled=true", "--api-versions", MONITORING_API).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d and d["kind"] in ("PodMonitor", "ServiceMonitor")}
    services = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Service"
                and d["metadata"]["labels"].get("app.kubernetes.io/component") == "metrics"]
    return docs["PodMonitor"], docs["ServiceMonitor"], services[0]


class PodDiscovery(threading.Thread):
    """Rewrites the file-SD targets from the API's pods every half second (what pod discovery watches)."""

    def __init__(self, cluster, job: str, path: Path):
        super().__init__(daemon=True)
        self.cluster, self.job, self.path = cluster, job, path
        self.stopped = threading.Event()
        self.write([])

    def write(self, groups: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.path)  # Prometheus never reads a half-written file

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            self.write(pod_target_groups(self.cluster.pods(self.job)))


@pytest.mark.timeout(420)
def test_dashboard_queries_return_data_and_alert_rules_evaluate(cluster, operator, tmp_path):
    name = unique("ppo-prom")
    podmonitor, servicemonitor, service = rendered_monitors(cluster)
    sd_file = tmp_path / "pods.json"
    discovery = PodDiscovery(cluster, name, sd_file)
    address = operator.metrics_url.removeprefix("http://").removesuffix("/metrics")
    prom = Prometheus(tmp_path, [*podmonitor_scrape_configs(podmonitor, sd_file),
                                 servicemonitor_scrape_config(servicemonitor, service, address)],
                      rule_files=[RULES], port=kube.free_port())
    prom.start()
    discovery.start()
    start = time.time()
    try:
        # Trackers too: the kube path of their links (trainer info series -> operator -> status) and of the key.
        key = f"key-{name}"
        cluster.kubectl("create", "secret", "generic", f"{name}-wandb", f"--from-literal=api-key={key}")
        manifest = example("ppo-tiny.yaml", name, maxSteps=8, checkpoint={"intervalSteps": 4, "keep": 1})
        manifest["spec"]["trackers"] = {"wandb": {"enabled": True, "mode": "offline",
                                                  "apiKeySecret": {"name": f"{name}-wandb", "key": "api-key"}},
                                        "mlflow": {"enabled": True}}
        cluster.apply(manifest)
        step = f'max(rlhf_trainer_step{{namespace="{NAMESPACE}", job="{name}", role="actor"}})'
        kube.wait_for(lambda: [r for r in prom.api("query", query=step)["result"] if float(r["value"][1]) >= 1],
                      timeout=240, interval=1, what=f"{name}'s actor step scraped")

        # While it runs: the trainers' metrics ports only, labelled by the PodMonitor's relabelings.
        targets = prom.api("targets")
        trainers = [t["labels"] for t in targets["activeTargets"] if t["labels"].get("job") == name]
        assert {(t["role"], t["rank"], t["namespace"], t["endpoint"], t["pod"]) for t in trainers} == {
            (role, "0", NAMESPACE, "metrics", f"{name}-{role}-0") for role in ("actor", "critic", "reference")}, trainers
        dropped_ports = {t["discoveredLabels"].get("__meta_kubernetes_pod_container_port_name")
                         for t in targets["droppedTargets"] if "__meta_kubernetes_pod_name" in t["discoveredLabels"]}
        assert {"role", "bridge"} <= dropped_ports  # the torch rendezvous ports are not scraped...
        assert {t["instance"].rsplit(":", 1)[1] for t in trainers} == {"9400"}  # ...the metrics port is
        operator_target = [t["labels"] for t in targets["activeTargets"] if t["labels"].get("endpoint") == "metrics"
                           and t["labels"].get("service")]
        assert [(t["job"], t["namespace"]) for t in operator_target] == [
            (service["metadata"]["name"], cluster.release.namespace)], operator_target

        # The stand-in kubelet read the Secret into the actor's env, as a kubelet does.
        assert cluster.kubelet.supervisor.get(f"{name}-actor-0").spec.env["WANDB_API_KEY"] == key

        job = cluster.wait_phase(name, timeout=240)
        assert job["status"]["phase"] == "Succeeded", job["status"]
        links = job["status"]["progress"]["trackers"]
        assert links["wandb"].startswith("file:///") and "/trackers/wandb/offline-run-" in links["wandb"], links
        assert links["mlflow"].startswith("file:///") and "/mlruns/" in links["mlflow"], links
        assert key not in json.dumps(job) + operator.log_tail(10**6)  # never in the status or the operator's log
        time.sleep(3)  # the operator's last phase change gets scraped
        end = time.time()

        # Every dashboard query, as Grafana sends it with this job selected, over the run.
        variables = {"namespace": NAMESPACE, "job": name, "datasource": "prometheus", "__rate_interval": "5s",
                     "__interval": "1s", "__range": f"{int(end - start) + 1}s"}
        empty = {}
        for title, expr in dashboard_queries():
            result = prom.query_range(grafana_substitute(expr, variables), start, end)  # a bad query raises
            if not any(series["values"] for series in result):
                empty[expr] = title
        assert set(empty) <= set(NO_DATA_IN_A_TINY_RUN), {e: empty[e] for e in set(empty) - set(NO_DATA_IN_A_TINY_RUN)}

        # Every alert rule evaluated, without error.
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == len([r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]])
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
    finally:
        discovery.stopped.set()
        prom.stop()
