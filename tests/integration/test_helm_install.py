"""`helm install` of charts/rlhf-operator watching one namespace, on the real control plane: the
API server validates every object against its OpenAPI schema, RBAC enforces the chart's roles, the
operator runs with the Deployment's args as the chart's ServiceAccount (so a verb missing from the
chart is a 403 here, as in a cluster), the trainer's ServiceAccount has no rights; then the
documented CRD upgrade path and `helm uninstall`.

The session's cluster-wide release (tests/controlplane/fixtures.py) installed the CRD already; this
module adds a second, namespaced release `scoped` next to it. Nothing starts the Deployment's pod
(no kubelet runs the operator image): the test starts `rlhf-operator operator` itself with the
stored container args (the ports excepted), exactly what the image's entry point would receive.
"""

from __future__ import annotations

import json

import pytest
import yaml
from operator_kube import NODE_POOL

from tests.controlplane import kube
from tests.controlplane.fixtures import CHART, TRAINER_SA, install_release

RELEASE, RELEASE_NS, JOB_NS, OTHER_NS = "scoped", "scoped-system", "team-a", "team-b"
FULLNAME = f"{RELEASE}-rlhf-operator"  # <release>-<chart>


@pytest.fixture(scope="module")
def namespaces(cluster):
    """Two job namespaces under Pod Security restricted; only team-a is watched."""
    kube.create_namespace(cluster, JOB_NS, node_selector=NODE_POOL)  # the chart adds the trainer SA
    kube.create_namespace(cluster, OTHER_NS, node_selector=NODE_POOL, service_accounts=[TRAINER_SA])
    return cluster


@pytest.fixture(scope="module")
def release(namespaces, tmp_path_factory):
    """The chart installed watching team-a only; uninstalled by the last test."""
    return install_release(namespaces, tmp_path_factory.mktemp("scoped"), "--set", f"watchNamespaces={{{JOB_NS}}}",
                           name=RELEASE, namespace=RELEASE_NS)


def manifest(name: str) -> str:
    obj = yaml.safe_load((CHART.parent.parent / "crds" / "examples" / "ppo-tiny.yaml").read_text())
    obj["metadata"] = {"name": name}
    return yaml.safe_dump(obj)


def job_pods(cp, namespace: str, name: str) -> dict[str, dict]:
    got = kube.get_json(cp, "pods", "-n", namespace, "-l", f"rlhf.dev/job={name}") or {}
    return {p["metadata"]["name"]: p for p in got.get("items", [])}


def can_i(cp, user: str, verb: str, resource: str, namespace: str, subresource: str = "") -> bool:
    """`kubectl auth can-i` for `user` (impersonated by the admin): the API server's RBAC answer."""
    sub = [f"--subresource={subresource}"] if subresource else []
    result = kube.kubectl(cp, "auth", "can-i", verb, resource, *sub, "-n", namespace, f"--as={user}", check=False)
    return result.stdout.strip() == "yes"


def test_install_creates_the_release_objects(cluster, release):
    crd = kube.get_json(cluster, "crd", "rlhfjobs.rlhf.dev")
    assert crd["spec"]["names"]["shortNames"] == ["rlhf"]
    deployment = kube.get_json(cluster, "deployment", FULLNAME, "-n", RELEASE_NS)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == FULLNAME == release.service_account
    # Namespaced mode: a Role in the watched namespace only, the trainer SA there without a token.
    assert kube.get_json(cluster, "role", FULLNAME, "-n", JOB_NS)["rules"]
    assert kube.get_json(cluster, "role", FULLNAME, "-n", OTHER_NS) is None
    trainer_sa = kube.get_json(cluster, "serviceaccount", TRAINER_SA, "-n", JOB_NS)
    assert trainer_sa["automountServiceAccountToken"] is False
    dashboards = kube.get_json(cluster, "configmaps", "-n", RELEASE_NS, "-l", "grafana_dashboard=1")
    assert [c["metadata"]["name"] for c in dashboards["items"]] == [f"{FULLNAME}-dashboard-rlhf-operator"]
    releases = yaml.safe_load(kube.helm(cluster, "list", "-n", RELEASE_NS, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [(RELEASE, "deployed")]


def test_rbac_grants_the_operator_its_verbs_in_team_a_only_and_the_trainer_nothing(cluster, release):
    operator = f"system:serviceaccount:{RELEASE_NS}:{FULLNAME}"
    assert can_i(cluster, operator, "create", "pods", JOB_NS)
    assert can_i(cluster, operator, "patch", "rlhfjobs.rlhf.dev", JOB_NS, subresource="status")
    assert not can_i(cluster, operator, "patch", "rlhfjobs.rlhf.dev", JOB_NS)  # the status only
    assert not can_i(cluster, operator, "create", "pods", OTHER_NS)
    assert not can_i(cluster, operator, "get", "secrets", JOB_NS)  # never needed, never granted
    assert not can_i(cluster, operator, "update", "rlhfjobs.rlhf.dev", JOB_NS)
    trainer = f"system:serviceaccount:{JOB_NS}:{TRAINER_SA}"
    for verb, resource in [("get", "pods"), ("list", "rlhfjobs.rlhf.dev"), ("get", "configmaps"),
                           ("create", "events")]:
        assert not can_i(cluster, trainer, verb, resource, JOB_NS), (verb, resource)
    # A real token of the operator's ServiceAccount gets a 403 outside its rules.
    with pytest.raises(AssertionError, match="Forbidden|forbidden"):
        kube.kubectl(cluster, "get", "pods", "-n", OTHER_NS, kubeconfig=release.kubeconfig)


def test_operator_with_the_chart_args_reconciles_jobs_in_the_watched_namespace_only(cluster, release, tmp_path):
    assert f"--namespace={JOB_NS}" in release.args and f"--trainer-service-account={TRAINER_SA}" in release.args
    operator = release.operator(cluster, tmp_path / "operator.log")
    try:
        for ns in (JOB_NS, OTHER_NS):
            kube.kubectl(cluster, "apply", "-n", ns, "-f", "-", input=manifest("first"))
        pods = kube.wait_for(lambda: len(p := job_pods(cluster, JOB_NS, "first")) == 3 and p,
                             timeout=60, interval=0.2, what="the gang of team-a/first")
        for pod in pods.values():
            assert pod["spec"]["serviceAccountName"] == TRAINER_SA
            assert pod["spec"]["automountServiceAccountToken"] is False
            assert pod["spec"]["nodeSelector"] == NODE_POOL  # the namespace's PodNodeSelector applied
        for name in pods:
            kube.set_pod_status(cluster, name, "Running", pod_ip="127.0.0.1", namespace=JOB_NS)
        kube.wait_for(lambda: ((kube.get_json(cluster, "rlhfjob", "first", "-n", JOB_NS) or {})
                               .get("status", {}).get("phase") == "Running"),
                      timeout=30, interval=0.2, what="team-a/first Running")
        # The short name and printer columns NOTES.txt tells users to read.
        table = kube.kubectl(cluster, "get", "rlhf", "-n", JOB_NS).stdout.splitlines()
        assert table[0].split()[:3] == ["NAME", "PHASE", "ALGORITHM"] and table[1].split()[:3] == ["first", "Running", "ppo"]
        # The job outside watchNamespaces is left alone.
        assert job_pods(cluster, OTHER_NS, "first") == {}
        assert "status" not in kube.get_json(cluster, "rlhfjob", "first", "-n", OTHER_NS)
        assert "Forbidden" not in operator.log_tail(10**6) and "403" not in operator.log_tail(10**6)
    except AssertionError:
        print(operator.log_tail(6000))
        raise
    finally:
        operator.stop()


def test_documented_crd_upgrade_then_helm_upgrade(cluster, release):
    # docs/install.md: helm never upgrades CRDs; apply them server-side first.
    kube.kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds" / "rlhfjobs.yaml"))
    kube.helm(cluster, "upgrade", RELEASE, str(CHART), "-n", RELEASE_NS, "--reuse-values",
              "--set", "defaultGangScheduler=volcano")
    deployment = kube.get_json(cluster, "deployment", FULLNAME, "-n", RELEASE_NS)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--default-gang-scheduler=volcano" in args
    assert f"--namespace={JOB_NS}" in args  # --reuse-values kept it
    status = json.loads(kube.helm(cluster, "status", RELEASE, "-n", RELEASE_NS, "-o", "json").stdout)
    assert status["version"] == 2


def test_uninstall_removes_the_release_but_keeps_the_crd_and_jobs(cluster, release):
    kube.helm(cluster, "uninstall", RELEASE, "-n", RELEASE_NS)
    kube.wait_for(lambda: kube.get_json(cluster, "deployment", FULLNAME, "-n", RELEASE_NS) is None,
                  what="the Deployment deleted")
    assert kube.get_json(cluster, "clusterrole", FULLNAME) is None
    assert kube.get_json(cluster, "role", FULLNAME, "-n", JOB_NS) is None
    assert kube.get_json(cluster, "serviceaccount", TRAINER_SA, "-n", JOB_NS) is None
    assert kube.get_json(cluster, "crd", "rlhfjobs.rlhf.dev") is not None
    assert kube.get_json(cluster, "rlhfjob", "first", "-n", JOB_NS) is not None
    for ns in (JOB_NS, OTHER_NS):
        kube.delete_namespace(cluster, ns)
