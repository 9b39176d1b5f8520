"""The Helm chart, rendered by the real helm (scripts/install_helm.sh puts it in .venv/bin).

Every test renders charts/rlhf-operator with `helm template` and checks the objects: RBAC exactly as
the operator needs it, namespaced Roles when namespaces are given, the trainer service account
without rights, secure pod defaults, the monitoring toggles and their CRD check, the values schema,
offline validation against the Kubernetes 1.36 schemas, and the CRD copy against crds/.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from rlhf_contract import wire
from rlhf_operator.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rlhf-operator"
HELM = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
MONITORING_API = "monitoring.coreos.com/v1"

pytestmark = pytest.mark.skipif(HELM is None, reason="helm binary missing: run scripts/install_helm.sh .venv/bin")


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)


@functools.cache  # several tests render the same values; helm is the slow part
def render_raw(*sets: str, api_versions: tuple[str, ...] = (), namespace: str = "rlhf-system",
               extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["template", "rel", str(CHART), "--namespace", namespace, *extra]
    for s in sets:
        args += ["--set", s]
    for api in api_versions:
        args += ["--api-versions", api]
    return helm(*args)


def render(*sets: str, api_versions: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> list[dict]:
    result = render_raw(*sets, api_versions=api_versions, extra=extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata'].get('name') for d in found]}"
    return found[0]


def rule_table(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a rule grants."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def grants(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources for v in verbs}


# What the operator does against the API (operator/rlhf_operator/kube/): kopf lists and watches
# every kind it indexes; the executor creates, deletes and patches what the planner asks for.
KOPF_WATCHED = (
    grants("rlhf.dev", ["rlhfjobs"], ["list", "watch"])
    | grants("", ["pods", "services", "configmaps", "persistentvolumeclaims"], ["list", "watch"])
)
NAMESPACED_APPLICATION = (
    KOPF_WATCHED
    | grants("", ["events"], ["create"])  # kopf's handler warnings and the operator's job events
    | grants("", ["events"], ["get", "patch"])  # a recurring warning's count (post_recurring_event)
    | grants("rlhf.dev", ["rlhfjobs/status"], ["patch"])  # status once per pass
    | grants("rlhf.dev", ["rlhfjobs"], ["delete"])  # ttlSecondsAfterFinished
    | grants("", ["pods"], ["create", "delete", "patch"])  # gang create / restart / finish; Kueue quota back
    | grants("", ["configmaps"], ["patch"])  # a spec edit rolled out
    | grants("", ["services", "configmaps", "persistentvolumeclaims"], ["create"])  # owner refs delete them
    | grants("", ["persistentvolumeclaims"], ["patch"])  # a fromJob dependant co-owns its source's claim
)
VOLCANO = grants("scheduling.volcano.sh", ["podgroups"], ["list", "watch", "create", "delete"])
COSCHEDULING = grants("scheduling.x-k8s.io", ["podgroups"], ["list", "watch", "create", "delete"])
KOPF_CRD_SCAN = grants("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"])
# kopf's namespace observer lists/watches namespaces only when given a namespace list.
KOPF_NAMESPACES = grants("", ["namespaces"], ["list", "watch"])


def test_helm_lint_strict_passes():
    result = helm("lint", str(CHART), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("version", "ok"), [("1.28.9", False), ("1.29.0", True), ("1.33.1", True)])
def test_chart_refuses_clusters_older_than_the_crds_cel_rules_need(version, ok):
    result = render_raw(extra=("--kube-version", version))
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert "kubeVersion" in result.stderr


def test_default_rbac_is_one_cluster_role_with_exactly_the_needed_rules():
    docs = render()
    role = one(docs, "ClusterRole")
    assert rule_table(role["rules"]) == NAMESPACED_APPLICATION | VOLCANO | COSCHEDULING | KOPF_CRD_SCAN
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    operator_sa = one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": operator_sa, "namespace": "rlhf-system"}]
    assert of_kind(docs, "Role") == [] and of_kind(docs, "RoleBinding") == []


def test_watch_namespaces_gives_a_role_per_namespace_and_no_cluster_wide_job_or_pod_rights():
    docs = render("watchNamespaces={team-a,team-b}")
    roles = {r["metadata"]["namespace"]: r for r in of_kind(docs, "Role")}
    assert set(roles) == {"team-a", "team-b"}
    for role in roles.values():
        assert rule_table(role["rules"]) == NAMESPACED_APPLICATION | VOLCANO | COSCHEDULING
    bindings = {b["metadata"]["namespace"]: b for b in of_kind(docs, "RoleBinding")}
    assert set(bindings) == {"team-a", "team-b"}
    for ns, binding in bindings.items():
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["roleRef"]["name"] == roles[ns]["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == "rlhf-system"
    # Cluster-wide: only what kopf reads there (CRDs, and namespaces for its namespace observer).
    assert rule_table(one(docs, "ClusterRole")["rules"]) == KOPF_CRD_SCAN | KOPF_NAMESPACES
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert parse_operator_args(args).namespace == ["team-a", "team-b"]


def test_every_rule_is_commented_framework_or_application():
    lines = (CHART / "templates" / "rbac" / "_rules.tpl").read_text().splitlines()
    comment_start = None  # first line of the latest comment paragraph
    rules = 0
    for i, line in enumerate(lines):
        if line.startswith("#") and (i == 0 or not lines[i - 1].startswith("#")):
            comment_start = line
        if line.startswith("- apiGroups:"):
            rules += 1
            assert comment_start and comment_start.startswith(("# framework", "# application")), (i + 1, line)
    assert rules >= 10


def test_watch_rules_cover_every_kind_kopf_handlers_watch():
    """kopf lists and watches each resource a handler of rlhf_operator.kube.handlers is registered for."""
    import kopf
    from rlhf_operator.kube import handlers  # noqa: F401  (registers into kopf's default registry)

    registry = kopf.get_default_registry()
    watched = {(h.selector.group, h.selector.plural or h.selector.any_name)
               for sub in (registry._indexing, registry._watching) for h in sub.get_all_handlers()}
    assert watched, "no kopf handlers registered"
    table = rule_table(one(render(), "ClusterRole")["rules"])
    for group, plural in watched:
        assert {(group, plural, "list"), (group, plural, "watch")} <= table, (group, plural)
    granted_watch = {(g, r) for g, r, v in table if v == "watch"} - {("apiextensions.k8s.io",
                                                                    "customresourcedefinitions")}
    assert granted_watch == watched, f"watch granted but not used: {granted_watch - watched}"
    # Change-detecting handlers would make kopf patch jobs (finalizers, progress): none, so no patch.
    assert not list(registry._changing.get_all_handlers()) and not list(registry._spawning.get_all_handlers())
    assert ("rlhf.dev", "rlhfjobs", "patch") not in table


def test_trainer_service_account_exists_per_watched_namespace_without_token_or_any_binding():
    for sets, namespaces in ([(), {"rlhf-system"}], [("watchNamespaces={team-a,team-b}",), {"team-a", "team-b"}]):
        docs = render(*sets)
        trainer_sas = [sa for sa in of_kind(docs, "ServiceAccount") if sa["metadata"]["name"] == "rlhf-trainer"]
        assert {sa["metadata"]["namespace"] for sa in trainer_sas} == namespaces
        assert all(sa["automountServiceAccountToken"] is False for sa in trainer_sas)
        subjects = [s for b in of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding")
                    for s in b["subjects"]]
        assert subjects and all(s["name"] != "rlhf-trainer" for s in subjects)
        args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert parse_operator_args(args).trainer_service_account == "rlhf-trainer"


def test_trainer_service_account_can_be_left_to_the_cluster_admin():
    docs = render("trainer.serviceAccount.create=false", "trainer.serviceAccount.name=ml-runner")
    assert [sa["metadata"]["name"] for sa in of_kind(docs, "ServiceAccount")] == ["rel-rlhf-operator"]
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert parse_operator_args(args).trainer_service_account == "ml-runner"


def test_gang_scheduler_rbac_toggles():
    no_volcano = rule_table(one(render("gangSchedulers.volcano.enabled=false"), "ClusterRole")["rules"])
    assert not no_volcano & VOLCANO and COSCHEDULING <= no_volcano
    neither = render("gangSchedulers.volcano.enabled=false", "gangSchedulers.coscheduling.enabled=false",
                     "watchNamespaces={team-a}")
    assert rule_table(one(neither, "Role")["rules"]) == NAMESPACED_APPLICATION


@pytest.mark.parametrize("scheduler", ["volcano", "coscheduling"])
def test_default_gang_scheduler_needs_its_rbac(scheduler):
    result = render_raw(f"defaultGangScheduler={scheduler}", f"gangSchedulers.{scheduler}.enabled=false")
    assert result.returncode != 0
    assert f"defaultGangScheduler={scheduler} needs gangSchedulers.{scheduler}.enabled=true" in result.stderr
    docs = render(f"defaultGangScheduler={scheduler}")
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert parse_operator_args(args).default_gang_scheduler == scheduler


def test_resync_seconds_reaches_the_operator():
    args = one(render("resyncSeconds=15"), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert parse_operator_args(args).resync_seconds == 15.0


def parse_operator_args(args: list[str]):
    """The Deployment's args through the operator's own argument parser: a renamed flag fails here."""
    return build_parser().parse_args(["operator", *args])


def test_operator_args_parse_and_match_ports_and_probes():
    docs = render("metrics.port=9090", "trainer.metricsPort=9500", "healthPort=8181")
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    parsed = parse_operator_args(container["args"])
    assert (parsed.namespace, parsed.metrics_port, parsed.trainer_metrics_port) == ([], 9090, 9500)
    assert parsed.liveness == "http://0.0.0.0:8181/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 8181}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["ports"][0]["port"] == 9090


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs
            if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


@pytest.mark.parametrize("sets", [(), ("watchNamespaces={a,b}",)])
def test_every_pod_template_runs_non_root_read_only_without_capabilities(sets):
    templates = pod_templates(render(*sets))
    assert templates
    for name, spec in templates:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, (name, container["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, container["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (name, container["name"])
            assert container["resources"]["limits"]["memory"], (name, container["name"])


def test_single_replica_and_recreate_strategy():
    deployment = one(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_image_tag_defaults_to_app_version_and_digest_wins():
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    image = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/rlhf-operator/operator:{app_version}"
    digest = "sha256:" + "ab" * 32
    pinned = one(render(f"image.digest={digest}", "image.tag=ignored"), "Deployment")
    assert pinned["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/rlhf-operator/operator@{digest}"


def test_monitors_are_off_by_default():
    kinds = {d["kind"] for d in render(api_versions=(MONITORING_API,))}
    assert "ServiceMonitor" not in kinds and "PodMonitor" not in kinds
    assert "Service" in kinds


@pytest.mark.parametrize("monitor", ["serviceMonitor", "podMonitor"])
def test_monitor_without_prometheus_operator_crds_fails_early_with_a_clear_message(monitor):
    result = render_raw(f"metrics.{monitor}.enabled=true")
    assert result.returncode != 0
    assert f"metrics.{monitor}.enabled=true needs the Prometheus Operator CRDs" in result.stderr
    assert "--api-versions monitoring.coreos.com/v1" in result.stderr


def test_monitors_on_select_the_operator_service_and_the_trainer_pods():
    docs = render("metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true",
                  "metrics.labels.release=kube-prometheus-stack", "metrics.interval=15s",
                  api_versions=(MONITORING_API,))
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["interval"] == "15s"
    # Per-job operator series carry namespace/job labels of the job: keep them.
    assert endpoint["honorLabels"] is True

    pods = one(docs, "PodMonitor")
    assert pods["spec"]["selector"] == {"matchExpressions": [{"key": "rlhf.dev/job", "operator": "Exists"}]}
    assert pods["spec"]["namespaceSelector"] == {"any": True}
    endpoint = pods["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # docs/spec.md: trainer series get job / role / rank from the pod labels the operator sets.
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel == {"job": ["__meta_kubernetes_pod_label_rlhf_dev_job"],
                       "role": ["__meta_kubernetes_pod_label_rlhf_dev_role"],
                       "rank": ["__meta_kubernetes_pod_label_rlhf_dev_role_index"]}

    scoped = render("metrics.podMonitor.enabled=true", "watchNamespaces={a,b}", api_versions=(MONITORING_API,))
    assert one(scoped, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}


def test_service_monitor_needs_the_metrics_service():
    result = render_raw("metrics.enabled=false", "metrics.serviceMonitor.enabled=true",
                        api_versions=(MONITORING_API,))
    assert result.returncode != 0 and "needs metrics.enabled=true" in result.stderr
    assert of_kind(render("metrics.enabled=false"), "Service") == []


def test_dashboards_ship_every_json_file_labelled_for_the_grafana_sidecar():
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files
    maps = [c for c in of_kind(render(), "ConfigMap") if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    shipped = {key: value for c in maps for key, value in c["data"].items()}
    assert set(shipped) == {f.name for f in files}
    for f in files:
        assert json.loads(shipped[f.name]) == json.loads(f.read_text())
    elsewhere = render("dashboards.namespace=monitoring", "dashboards.annotations.grafana_folder=RLHF")
    for c in of_kind(elsewhere, "ConfigMap"):
        assert c["metadata"]["namespace"] == "monitoring"
        assert c["metadata"]["annotations"] == {"grafana_folder": "RLHF"}


def test_dashboards_off():
    assert of_kind(render("dashboards.enabled=false"), "ConfigMap") == []


@pytest.mark.parametrize("bad, field", [
    ("replicas=2", "/replicas"),
    ("defaultGangScheduler=kueue", "/defaultGangScheduler"),
    ("resyncSeconds=0", "/resyncSeconds"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("image.digest=latest", "/image/digest"),
    ("metrics.port=0", "/metrics/port"),
    ("metrics.interval=soon", "/metrics/interval"),
    ("watchNamespaces={Team_A}", "/watchNamespaces/0"),
    ("trainer.serviceAccount.name=", "/trainer/serviceAccount/name"),
    ("metrics.serviceMonitor.enabled=yes", "/metrics/serviceMonitor/enabled"),
    ("replica=1", "replica"),
])
def test_values_schema_rejects_bad_values_naming_the_field(bad, field):
    result = render_raw(bad)
    assert result.returncode != 0, f"{bad} was accepted"
    assert "schema" in result.stderr and field in result.stderr, result.stderr


# kubernetes-validate only knows built-in kinds; these come from other projects' CRDs.
CRD_BASED_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD, not in the Kubernetes schemas",
    ("monitoring.coreos.com/v1", "PodMonitor"): "Prometheus Operator CRD, not in the Kubernetes schemas",
}


@pytest.mark.parametrize("sets", [
    (),
    ("watchNamespaces={team-a,team-b}",),
    ("metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true"),
    ("dashboards.enabled=false", "gangSchedulers.volcano.enabled=false", "priorityClassName=high",
     "tolerations[0].key=gpu", "tolerations[0].operator=Exists", "nodeSelector.pool=system",
     "imagePullSecrets[0].name=regcred", "extraEnv[0].name=LOG_LEVEL", "extraEnv[0].value=debug"),
], ids=["defaults", "namespaced", "monitoring", "toggles"])
def test_rendered_objects_validate_strictly_against_kubernetes_1_36(sets):
    docs = render(*sets, api_versions=(MONITORING_API,), extra=("--include-crds",))
    checked = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_BASED_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, "1.36", strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 5


def test_chart_crd_is_a_byte_copy_of_crds_folder():
    source = REPO / "crds" / "rlhfjobs.yaml"
    copy = CHART / "crds" / "rlhfjobs.yaml"
    assert source.exists(), "crds/rlhfjobs.yaml is missing"
    assert copy.exists(), "chart CRD missing: run scripts/sync_crd.sh"
    assert copy.read_bytes() == source.read_bytes(), "chart CRD drifted from crds/rlhfjobs.yaml: run scripts/sync_crd.sh"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["rlhfjobs.yaml"]


def test_helm_installs_the_crd_from_the_chart():
    crds = of_kind(render(extra=("--include-crds",)), "CustomResourceDefinition")
    assert [c["metadata"]["name"] for c in crds] == ["rlhfjobs.rlhf.dev"]


def test_pod_monitor_finds_the_metrics_port_and_labels_of_trainer_pods():
    """The PodMonitor scrapes a named container port and relabels pod labels: the builders must set them."""
    from rlhf_operator import api, builders

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    manifest = yaml.safe_load((REPO / "crds" / "examples" / "ppo-tiny.yaml").read_text())
    manifest["metadata"].setdefault("namespace", "team-a")
    settings = builders.BuildSettings(trainer_metrics_port=values["trainer"]["metricsPort"])
    pods = builders.build_gang(api.parse_job(manifest), 0, settings)
    assert pods
    for pod in pods:
        container = next(c for c in pod["spec"]["containers"] if c["name"] == wire.CONTAINER_NAME)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[values["metrics"]["podMonitor"]["portName"]] == values["trainer"]["metricsPort"]
        labels = pod["metadata"]["labels"]
        assert {wire.LABEL_JOB, wire.LABEL_ROLE, wire.LABEL_ROLE_INDEX} <= set(labels)
    # Prometheus turns pod label rlhf.dev/role-index into __meta_kubernetes_pod_label_rlhf_dev_role_index.
    monitor = one(render("metrics.podMonitor.enabled=true", api_versions=(MONITORING_API,)), "PodMonitor")
    sources = {r["sourceLabels"][0] for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    expected = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)
                for label in (wire.LABEL_JOB, wire.LABEL_ROLE, wire.LABEL_ROLE_INDEX)}
    assert sources == expected
    assert monitor["spec"]["selector"]["matchExpressions"][0]["key"] == wire.LABEL_JOB


def test_kubernetes_validate_cli_passes_every_default_object(tmp_path):
    """The same check as the command line CI users run: kubernetes-validate --strict -k 1.36."""
    result = render_raw(extra=("--include-crds",))
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(result.stdout)
    cli = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or "kubernetes-validate"
    check = subprocess.run([cli, "--strict", "-k", "1.36", str(rendered)], capture_output=True, text=True,
                           timeout=120)
    output = check.stdout + check.stderr
    assert check.returncode == 0, output
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert output.count("passed for resource") == len(documents), output


def test_rbac_and_operator_service_account_can_be_brought_by_the_cluster_admin():
    docs = render("rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops-rlhf")
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    assert [sa["metadata"]["name"] for sa in of_kind(docs, "ServiceAccount")] == ["rlhf-trainer"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-rlhf"
