"""Helpers for the operator integration tests: manifests, reading children, playing the kubelet
(the tier's pods are never scheduled: no node is in their pool, so the tests write their status)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.controlplane import kube
from tests.controlplane.cluster import ControlPlane

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "crds" / "examples"
NS = "rlhf-it"  # the integration tier's job namespace (conftest.py prepares it)
NODE_POOL = {"rlhf.dev/pool": "integration"}  # its pods' node selector: a pool without nodes


def example(file: str, name: str, **spec: Any) -> dict[str, Any]:
    """crds/examples/FILE renamed to NAME, with top-level spec keys replaced."""
    obj = yaml.safe_load((EXAMPLES / file).read_text())
    obj["metadata"] = {"name": name, "namespace": NS}
    obj["spec"].update(copy.deepcopy(spec))
    return obj


def apply(cp: ControlPlane, obj: dict[str, Any], check: bool = True):
    return kube.kubectl(cp, "apply", "-n", NS, "-f", "-", input=yaml.safe_dump(obj), check=check)


def get(cp: ControlPlane, kind: str, name: str) -> dict[str, Any] | None:
    """One object by plural resource path (pods, services, configmaps, ...) in NS; None if absent."""
    prefix = "/apis/rlhf.dev/v1alpha1" if kind == "rlhfjobs" else "/api/v1"
    return kube.api_request(cp, "GET", f"{prefix}/namespaces/{NS}/{kind}/{name}")


def job(cp: ControlPlane, name: str) -> dict[str, Any] | None:
    return get(cp, "rlhfjobs", name)


def pods(cp: ControlPlane, name: str) -> dict[str, dict[str, Any]]:
    got = kube.api_request(cp, "GET", f"/api/v1/namespaces/{NS}/pods?{urlencode({'labelSelector': f'rlhf.dev/job={name}'})}")
    return {p["metadata"]["name"]: p for p in (got or {}).get("items", [])}


def events(cp: ControlPlane, name: str) -> list[dict[str, Any]]:
    selector = urlencode({"fieldSelector": f"involvedObject.name={name}"})
    got = kube.api_request(cp, "GET", f"/api/v1/namespaces/{NS}/events?{selector}")
    return (got or {}).get("items", [])


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def wait_phase(cp: ControlPlane, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
    return kube.wait_for(lambda: (j := job(cp, name)) and j.get("status", {}).get("phase") == phase and j,
                            timeout=timeout, interval=0.1, what=f"job {name} phase {phase}")


def wait_pods(cp: ControlPlane, name: str, count: int, attempt: int = 0, timeout: float = 20):
    """Wait until the job has exactly `count` pods, all of restart attempt `attempt`."""
    def ready():
        got = pods(cp, name)
        labels = [p["metadata"]["labels"].get("rlhf.dev/restart-attempt") for p in got.values()]
        return len(got) == count and all(a == str(attempt) for a in labels) and got
    return kube.wait_for(ready, timeout=timeout, interval=0.1, what=f"{count} pods of {name} attempt {attempt}")


def set_all(cp: ControlPlane, names, phase: str, exit_code: int | None = None, pod_ip: str = "") -> None:
    """Play the kubelet: write each pod's status as its kubelet would."""
    for name in sorted(names):
        kube.set_pod_status(cp, name, phase, pod_ip=pod_ip, exit_code=exit_code, namespace=NS)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(op: kube.Operator, name: str, **labels: str) -> float | None:
    return samples(op.scrape()).get((name, tuple(sorted(labels.items()))))


def config_json(cp: ControlPlane, name: str) -> dict[str, Any]:
    cm = get(cp, "configmaps", f"{name}-config")
    return json.loads(cm["data"]["config.json"])
