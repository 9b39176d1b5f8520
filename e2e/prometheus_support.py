"""A real Prometheus (Debian's `prometheus` package) for the e2e tier, scraping what the chart's PodMonitor
and ServiceMonitor select, with the relabelling the Prometheus Operator generates from them.

Debian builds Prometheus without Kubernetes service discovery, so the targets come from file-based
discovery instead: `pod_target_groups()` writes, for every container port of every pod, the target and
the `__meta_kubernetes_*` labels that `kubernetes_sd_configs: [{role: pod}]` would give it, and
`podmonitor_scrape_configs()` turns the rendered PodMonitor into scrape configs whose relabel rules are
those the Prometheus Operator writes (prometheus-operator pkg/prometheus/promcfg.go,
generatePodMonitorConfig: keep the selected pods, drop finished ones, keep the named port, then
namespace / container / pod / job / endpoint, then the PodMonitor's own relabelings). The operator
runs outside the cluster here, so its Service's endpoint is one static target with the labels the
ServiceMonitor's endpoints discovery would give it (`servicemonitor_scrape_config()`).

    prom = Prometheus(workdir, scrape_configs, rule_files=[...]).start()
    prom.query_range('rlhf_trainer_step', start, end)      # the HTTP API's result list
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS = shutil.which("prometheus")
SCRAPE_INTERVAL = "1s"


def _sanitize(name: str) -> str:
    """A label or annotation key as Kubernetes discovery spells it in meta labels (rlhf.dev/job -> rlhf_dev_job)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_target_groups(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """File-SD target groups for `pods`, one per container port, labelled as Kubernetes pod discovery
    labels them. Pods without a podIP yet have no targets (as in discovery)."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status", {})
        if not status.get("podIP"):
            continue
        base = {"__meta_kubernetes_namespace": meta["namespace"], "__meta_kubernetes_pod_name": meta["name"],
                "__meta_kubernetes_pod_ip": status["podIP"], "__meta_kubernetes_pod_phase": status.get("phase", ""),
                "__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", "")}
        for key, value in meta.get("labels", {}).items():
            base[f"__meta_kubernetes_pod_label_{_sanitize(key)}"] = value
            base[f"__meta_kubernetes_pod_labelpresent_{_sanitize(key)}"] = "true"
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                labels = {**base, "__meta_kubernetes_pod_container_name": container["name"],
                          "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                          "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                          "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP")}
                groups.append({"targets": [f"{status['podIP']}:{port['containerPort']}"], "labels": labels})
    return groups


def _relabelings(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The monitoring.coreos.com RelabelConfig spelling (sourceLabels, targetLabel) in Prometheus's."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{keys.get(k, k.lower()): v for k, v in item.items()} for item in items]


def _selector_rules(selector: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """keep rules of a label selector, as the Prometheus Operator writes them (kind: pod or service)."""
    rules = []
    for key, value in selector.get("matchLabels", {}).items():
        rules.append({"action": "keep", "regex": f"({value});true",
                      "source_labels": [f"__meta_kubernetes_{kind}_label_{_sanitize(key)}",
                                        f"__meta_kubernetes_{kind}_labelpresent_{_sanitize(key)}"]})
    for expr in selector.get("matchExpressions", []):
        label = _sanitize(expr["key"])
        if expr["operator"] == "Exists":
            rules.append({"action": "keep", "regex": "true",
                          "source_labels": [f"__meta_kubernetes_{kind}_labelpresent_{label}"]})
        elif expr["operator"] == "In":
            rules.append({"action": "keep", "regex": "|".join(expr["values"]),
                          "source_labels": [f"__meta_kubernetes_{kind}_label_{label}"]})
        else:
            raise ValueError(f"selector operator {expr['operator']!r} is not mirrored here")
    return rules


def _namespace_rule(selector: dict[str, Any], own_namespace: str) -> list[dict[str, Any]]:
    if selector.get("any"):
        return []
    names = selector.get("matchNames") or [own_namespace]
    return [{"action": "keep", "regex": "|".join(names), "source_labels": ["__meta_kubernetes_namespace"]}]


def podmonitor_scrape_configs(monitor: dict[str, Any], sd_file: Path) -> list[dict[str, Any]]:
    """One scrape config per podMetricsEndpoint of a rendered PodMonitor, reading targets from `sd_file`."""
    meta, spec = monitor["metadata"], monitor["spec"]
    configs = []
    for i, endpoint in enumerate(spec["podMetricsEndpoints"]):
        rules = [*_namespace_rule(spec.get("namespaceSelector", {}), meta["namespace"]),
                 *_selector_rules(spec.get("selector", {}), "pod"),
                 {"action": "drop", "regex": "(Failed|Succeeded)", "source_labels": ["__meta_kubernetes_pod_phase"]}]
        if "port" in endpoint:
            rules.append({"action": "keep", "regex": endpoint["port"],
                          "source_labels": ["__meta_kubernetes_pod_container_port_name"]})
        rules += [
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
        ]
        if "port" in endpoint:
            rules.append({"target_label": "endpoint", "replacement": endpoint["port"]})
        rules += _relabelings(endpoint.get("relabelings", []))
        configs.append({"job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{i}",
                        "honor_labels": bool(endpoint.get("honorLabels", False)),
                        "metrics_path": endpoint.get("path", "/metrics"),
                        "scrape_interval": SCRAPE_INTERVAL,
                        "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}],
                        "relabel_configs": rules})
    return configs


def servicemonitor_scrape_config(monitor: dict[str, Any], service: dict[str, Any], address: str) -> dict[str, Any]:
    """The ServiceMonitor's first endpoint as a scrape config of one static target at `address` (the
    operator process), labelled as endpoints discovery would label the Service's endpoint."""
    meta, spec = monitor["metadata"], monitor["spec"]
    endpoint = spec["endpoints"][0]
    svc = service["metadata"]
    labels = {"__meta_kubernetes_namespace": svc["namespace"], "__meta_kubernetes_service_name": svc["name"],
              "__meta_kubernetes_endpoint_port_name": endpoint["port"]}
    for key, value in svc.get("labels", {}).items():
        labels[f"__meta_kubernetes_service_label_{_sanitize(key)}"] = value
        labels[f"__meta_kubernetes_service_labelpresent_{_sanitize(key)}"] = "true"
    rules = [*_namespace_rule(spec.get("namespaceSelector", {}), meta["namespace"]),
             *_selector_rules(spec.get("selector", {}), "service"),
             {"action": "keep", "regex": endpoint["port"], "source_labels": ["__meta_kubernetes_endpoint_port_name"]},
             {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
             {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
             {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
             {"target_label": "endpoint", "replacement": endpoint["port"]},
             *_relabelings(endpoint.get("relabelings", []))]
    return {"job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/0",
            "honor_labels": bool(endpoint.get("honorLabels", False)),
            "metrics_path": endpoint.get("path", "/metrics"), "scrape_interval": SCRAPE_INTERVAL,
            "static_configs": [{"targets": [address], "labels": labels}], "relabel_configs": rules}


class Prometheus:
    """A Prometheus server on loopback with the given scrape configs and rule files."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]], rule_files: list[Path], port: int):
        self.workdir, self.port = workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(p) for p in rule_files], "scrape_configs": scrape_configs}, sort_keys=False))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Prometheus:
        log = open(self.workdir / "prometheus.log", "w")  # noqa: SIM115 - the process writes it until stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text()[-chars:] if path.exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the `data` of a success, AssertionError with Prometheus's error otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: str = SCRAPE_INTERVAL) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]
