"""`helm install` of charts/rlhf-operator into the API emulator, the operator run with the args of the
Deployment the chart stored, a job reconciled in the watched namespace, the documented CRD upgrade
path, and `helm uninstall`.

The emulator runs no controllers, so nothing starts the Deployment's pod: the test starts
`rlhf-operator operator` itself with the stored container args (the ports excepted: local free
ports instead of 8080/8081), exactly what the image's entry point would receive.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.kube_emulator` is imported from the repository root
    sys.path.insert(0, str(REPO))

from tests.kube_emulator import harness  # noqa: E402

CHART = REPO / "charts" / "rlhf-operator"
RELEASE, RELEASE_NS, JOB_NS, OTHER_NS = "rlhf-operator", "rlhf-system", "team-a", "team-b"
TRAINER_SA = "rlhf-trainer"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fresh emulator of its own (so that helm, not a fixture, installs the RLHFJob CRD) with the
    PodGroup CRDs a cluster with Volcano and coscheduling has, and three namespaces."""
    emu = harness.start_emulator(tmp_path_factory.mktemp("helm-emulator"))
    try:
        harness.install_crds(emu, [harness.VOLCANO_CRD, harness.COSCHEDULING_CRD])
        namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                      for ns in (RELEASE_NS, JOB_NS, OTHER_NS)]
        harness.kubectl(emu, "apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(namespaces))
        yield emu
    finally:
        harness.stop_emulator(emu)


@pytest.fixture(scope="module")
def release(cluster):
    """The chart installed watching one namespace; uninstalled by the last test."""
    result = harness.helm(cluster, "install", RELEASE, str(CHART), "-n", RELEASE_NS, "--disable-openapi-validation",
                          "--set", f"watchNamespaces={{{JOB_NS}}}", "--wait=hookOnly")
    assert "STATUS: deployed" in result.stdout, result.stdout
    return result


def operator_args(deployment: dict) -> list[str]:
    """The stored container args minus the two listening ports, which the harness picks."""
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a for a in args if not a.startswith(("--metrics-port=", "--liveness="))]


def manifest(name: str) -> str:
    obj = yaml.safe_load((REPO / "crds" / "examples" / "ppo-tiny.yaml").read_text())
    obj["metadata"] = {"name": name}
    return yaml.safe_dump(obj)


def job_pods(emu, namespace: str, name: str) -> dict[str, dict]:
    got = harness.get_json(emu, "pods", "-n", namespace, "-l", f"rlhf.dev/job={name}") or {}
    return {p["metadata"]["name"]: p for p in got.get("items", [])}


def test_install_creates_the_crd_and_the_release_objects(cluster, release):
    harness.kubectl(cluster, "wait", "--for=condition=Established", "crd/rlhfjobs.rlhf.dev", "--timeout=20s")
    crd = harness.get_json(cluster, "crd", "rlhfjobs.rlhf.dev")
    assert crd["spec"]["names"]["shortNames"] == ["rlhf"]
    deployment = harness.get_json(cluster, "deployment", "rlhf-operator", "-n", RELEASE_NS)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "rlhf-operator"
    assert harness.get_json(cluster, "serviceaccount", "rlhf-operator", "-n", RELEASE_NS)
    # Namespaced mode: a Role in the watched namespace only, the trainer SA there without a token.
    assert harness.get_json(cluster, "role", "rlhf-operator", "-n", JOB_NS)["rules"]
    assert harness.get_json(cluster, "role", "rlhf-operator", "-n", OTHER_NS) is None
    trainer_sa = harness.get_json(cluster, "serviceaccount", TRAINER_SA, "-n", JOB_NS)
    assert trainer_sa["automountServiceAccountToken"] is False
    dashboards = harness.get_json(cluster, "configmaps", "-n", RELEASE_NS, "-l", "grafana_dashboard=1")
    assert [c["metadata"]["name"] for c in dashboards["items"]] == ["rlhf-operator-dashboard-rlhf-operator"]
    releases = yaml.safe_load(harness.helm(cluster, "list", "-n", RELEASE_NS, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [(RELEASE, "deployed")]


def test_operator_with_the_chart_args_reconciles_jobs_in_the_watched_namespace_only(cluster, release, tmp_path):
    deployment = harness.get_json(cluster, "deployment", "rlhf-operator", "-n", RELEASE_NS)
    args = operator_args(deployment)
    assert f"--namespace={JOB_NS}" in args and f"--trainer-service-account={TRAINER_SA}" in args
    operator = harness.start_operator(cluster, tmp_path / "operator.log", *args)
    try:
        for ns in (JOB_NS, OTHER_NS):
            harness.kubectl(cluster, "apply", "--validate=false", "-n", ns, "-f", "-", input=manifest("first"))
        pods = harness.wait_for(lambda: len(p := job_pods(cluster, JOB_NS, "first")) == 3 and p,
                                timeout=30, interval=0.1, what="the gang of team-a/first")
        for pod in pods.values():
            assert pod["spec"]["serviceAccountName"] == TRAINER_SA
            assert pod["spec"]["automountServiceAccountToken"] is False
        for name in pods:
            harness.set_pod_status(cluster, name, "Running", pod_ip="127.0.0.1", namespace=JOB_NS)
        harness.wait_for(lambda: ((harness.get_json(cluster, "rlhfjob", "first", "-n", JOB_NS) or {})
                                  .get("status", {}).get("phase") == "Running"),
                         timeout=30, interval=0.1, what="team-a/first Running")
        # The short name NOTES.txt tells users to type (the emulator renders no printer columns).
        names = harness.kubectl(cluster, "get", "rlhf", "-n", JOB_NS, "-o", "name").stdout.split()
        assert names == ["rlhfjob.rlhf.dev/first"]
        # The job outside watchNamespaces is left alone.
        assert job_pods(cluster, OTHER_NS, "first") == {}
        assert "status" not in harness.get_json(cluster, "rlhfjob", "first", "-n", OTHER_NS)
    except AssertionError:
        print(operator.log_tail(6000))
        raise
    finally:
        operator.stop()


def test_documented_crd_upgrade_then_helm_upgrade(cluster, release):
    # docs/install.md: helm never upgrades CRDs; apply them server-side first.
    harness.kubectl(cluster, "apply", "--server-side", "--force-conflicts", "--validate=false", "-f", str(CHART / "crds" / "rlhfjobs.yaml"))
    harness.helm(cluster, "upgrade", RELEASE, str(CHART), "-n", RELEASE_NS, "--reuse-values",
                 "--disable-openapi-validation", "--set", "defaultGangScheduler=volcano")
    deployment = harness.get_json(cluster, "deployment", "rlhf-operator", "-n", RELEASE_NS)
    assert "--default-gang-scheduler=volcano" in operator_args(deployment)
    assert f"--namespace={JOB_NS}" in operator_args(deployment)  # --reuse-values kept it
    status = yaml.safe_load(harness.helm(cluster, "status", RELEASE, "-n", RELEASE_NS, "-o", "json").stdout)
    assert status["version"] == 2


def test_uninstall_removes_the_release_but_keeps_the_crd_and_jobs(cluster, release):
    harness.helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NS)
    harness.wait_for(lambda: harness.get_json(cluster, "deployment", "rlhf-operator", "-n", RELEASE_NS) is None,
                     what="the Deployment deleted")
    assert harness.get_json(cluster, "clusterrole", "rlhf-operator") is None
    assert harness.get_json(cluster, "role", "rlhf-operator", "-n", JOB_NS) is None
    assert harness.get_json(cluster, "serviceaccount", TRAINER_SA, "-n", JOB_NS) is None
    assert harness.get_json(cluster, "crd", "rlhfjobs.rlhf.dev") is not None
    assert harness.get_json(cluster, "rlhfjob", "first", "-n", JOB_NS) is not None
