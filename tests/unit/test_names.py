"""Every name, hostname and label value the builders derive is valid for every spec the API accepts
(issue 18, part 2): a property over generated specs, not a few cases.

The rules below are Kubernetes' own (k8s.io/apimachinery/pkg/util/validation and the per-kind name
validation of pkg/apis/core/validation), written out here apart from rlhf_operator.api, so that a rule
the operator gets wrong shows up as a failure instead of agreeing with itself. Each generated spec is
also sent through the emulated API server of test_crd.py (schema + CEL): the CRD and parse_job must
accept and refuse the same specs.
"""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st
from rlhf_contract import algorithms
from rlhf_operator import api, builders
from rlhf_operator.api import SpecError, parse_job
from test_crd import api_server_errors

# --- Kubernetes' validation, as apimachinery defines it ------------------------------------------------

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def is_dns1123_label(text: str) -> bool:
    return len(text) <= 63 and re.fullmatch(_LABEL, text) is not None


def is_dns1123_subdomain(text: str) -> bool:
    return len(text) <= 253 and re.fullmatch(rf"{_LABEL}(\.{_LABEL})*", text) is not None


def is_dns1035_label(text: str) -> bool:
    return len(text) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", text) is not None


def is_label_value(text: str) -> bool:
    return len(text) <= 63 and re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", text) is not None


def is_qualified_name(text: str) -> bool:
    prefix, _, name = text.rpartition("/")
    if "/" in text and not is_dns1123_subdomain(prefix):
        return False
    return 0 < len(name) <= 63 and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", name) is not None


def is_port_name(text: str) -> bool:
    """IANA_SVC_NAME: at most 15 characters, lowercase alphanumerics and '-', a letter, no '--'."""
    return (len(text) <= 15 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text) is not None
            and "--" not in text and re.search(r"[a-z]", text) is not None)


def is_fqdn(text: str) -> bool:
    return len(text) <= 253 and all(is_dns1123_label(part) for part in text.split("."))


def label_problems(where: str, labels: dict[str, str]) -> list[str]:
    return [f"{where} {k}={v!r}" for k, v in labels.items() if not (is_qualified_name(k) and is_label_value(v))]


def pod_problems(pod: dict[str, Any]) -> list[str]:
    """What the API server would refuse in a pod the builders made (names, hostnames, labels)."""
    meta, spec = pod["metadata"], pod["spec"]
    problems = [] if is_dns1123_subdomain(meta["name"]) else [f"pod name {meta['name']!r}"]
    problems += [f"{key} {spec[key]!r}" for key in ("hostname", "subdomain") if not is_dns1123_label(spec[key])]
    problems += label_problems("label", meta.get("labels", {}))
    problems += [f"annotation {k}" for k in meta.get("annotations", {}) if not is_qualified_name(k)]
    problems += label_problems("nodeSelector", spec.get("nodeSelector", {}))
    for key in ("serviceAccountName", "priorityClassName", "schedulerName"):
        if key in spec and not is_dns1123_subdomain(spec[key]):
            problems.append(f"{key} {spec[key]!r}")
    for volume in spec["volumes"]:
        for source, field in (("configMap", "name"), ("persistentVolumeClaim", "claimName")):
            if source in volume and not is_dns1123_subdomain(volume[source][field]):
                problems.append(f"volume {volume['name']} {source}.{field} {volume[source][field]!r}")
    for container in spec["containers"]:
        problems += [] if is_dns1123_label(container["name"]) else [f"container {container['name']!r}"]
        problems += [f"port {p['name']!r}" for p in container.get("ports", []) if not is_port_name(p["name"])]
        for var in container["env"]:
            if not re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", var["name"]):
                problems.append(f"env {var['name']!r}")
            if var["name"] in ("RLHF_ROLE_ADDRS", "RLHF_BRIDGE_ADDR"):
                hosts = [item.rpartition("=")[2].rpartition(":")[0] for item in var["value"].split(",")]
                problems += [f"{var['name']} host {h!r}" for h in hosts if not is_fqdn(h)]
    return problems


def support_problems(obj: dict[str, Any]) -> list[str]:
    meta = obj["metadata"]
    valid_name = is_dns1035_label if obj["kind"] == "Service" else is_dns1123_subdomain
    problems = [] if valid_name(meta["name"]) else [f"{obj['kind']} name {meta['name']!r}"]
    problems += label_problems(f"{obj['kind']} label", meta.get("labels", {}))
    if obj["kind"] == "Service":
        problems += label_problems("Service selector", obj["spec"]["selector"])
        problems += [f"Service port {p['name']!r}" for p in obj["spec"]["ports"] if not is_port_name(p["name"])]
    if obj["kind"] == "ConfigMap":
        problems += [f"ConfigMap key {k!r}" for k in obj["data"] if not re.fullmatch(r"[-._a-zA-Z0-9]+", k)]
    if obj["kind"] == "PersistentVolumeClaim" and "storageClassName" in obj["spec"]:
        problems += [] if is_dns1123_subdomain(obj["spec"]["storageClassName"]) else ["storageClassName"]
    return problems


def test_the_rules_themselves():
    assert is_dns1035_label("dpo-7b") and not is_dns1035_label("7b-dpo") and not is_dns1035_label("a.b")
    assert is_dns1123_subdomain("llama-v0.1-dpo") and not is_dns1123_subdomain("a..b")
    assert is_label_value("") and is_label_value("A_b.c") and not is_label_value("-a") and not is_label_value("a" * 64)
    assert is_qualified_name("kueue.x-k8s.io/queue-name") and not is_qualified_name("a/b/c")
    assert is_port_name("metrics") and not is_port_name("1234") and not is_port_name("a--b")
    assert is_fqdn("j-actor-0.j.ns.svc.cluster.local") and not is_fqdn(f"{'a' * 64}.svc")


# --- generated specs ---------------------------------------------------------------------------------

_NAME_START = string.ascii_lowercase
_NAME_INNER = string.ascii_lowercase + string.digits + "-"
_NAME_END = string.ascii_lowercase + string.digits


@st.composite
def dns_names(draw: st.DrawFn, min_size: int = 1, max_size: int = 70) -> str:
    """Names of every length, mostly of the right characters (so that many specs are accepted)."""
    # sampled_from spreads the lengths evenly (integers() favours small values)
    size = draw(st.sampled_from(range(min_size, max_size + 1)))
    if size == 1:
        return draw(st.sampled_from(_NAME_START))
    middle = draw(st.text(_NAME_INNER, min_size=size - 2, max_size=size - 2))
    return draw(st.sampled_from(_NAME_START)) + middle + draw(st.sampled_from(_NAME_END))


ODD_NAMES = st.text(string.ascii_letters + string.digits + "-._ /", min_size=1, max_size=70)
# Lengths near the limits (where `<job>-<role>-<index>` reaches 63 characters) get a generator of their own.
JOB_NAMES = st.one_of(dns_names(), dns_names(min_size=44, max_size=58), dns_names(max_size=12), ODD_NAMES,
                      st.sampled_from(["7b-dpo", "llama-v0.1-dpo"]))
QUEUES = st.one_of(st.just(""), dns_names(), ODD_NAMES)
NODE_LABELS = st.dictionaries(st.one_of(st.sampled_from(["gpu", "node.kubernetes.io/instance-type", "x/y/z"]),
                                        ODD_NAMES),
                              st.one_of(dns_names(), st.sampled_from(["", "A100_80GB", "-bad"]), ODD_NAMES),
                              max_size=2)
# Counts where the number of digits of the last index changes, and a few others.
REPLICAS = st.one_of(st.sampled_from([1, 2, 10, 11, 100, 101, 1000, 1001, 10000, 10001]), st.integers(1, 20000))
MAX_RESTARTS = st.one_of(st.sampled_from([0, 3, 9, 10, 99, 10**4, 10**6, 10**9]), st.integers(0, 10**9))


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    algorithm = draw(st.sampled_from(algorithms.NAMES))
    reward_type = draw(st.sampled_from(algorithms.REWARD_TYPES)) if algorithm in algorithms.ONLINE else "model"
    actor_replicas = draw(REPLICAS)
    roles: list[dict[str, Any]] = [{"name": "actor", "replicas": actor_replicas}]
    for name in algorithms.required_roles(algorithm, reward_type)[1:]:
        role: dict[str, Any] = {"name": name, "replicas": draw(st.sampled_from([1, actor_replicas]))}
        if draw(st.booleans()):
            role["colocateWith"] = "actor"
        roles.append(role)
    for role in roles:
        if draw(st.integers(0, 3)) == 0:
            role["nodeSelector"] = draw(NODE_LABELS)
    spec: dict[str, Any] = {
        "algorithm": algorithm, "image": "trainer:1", "model": {"path": "tiny://llama"},
        "dataset": {"path": "synthetic://arithmetic"}, "roles": draw(st.permutations(roles)),
        "hyperparameters": {"batchSize": actor_replicas * draw(st.integers(1, 3))},
        "scheduling": {"gangScheduler": draw(st.sampled_from(api.GANG_SCHEDULERS)), "queue": draw(QUEUES),
                       "priorityClassName": draw(st.one_of(st.just(""), dns_names(), ODD_NAMES))},
        "failurePolicy": {"maxRestarts": draw(MAX_RESTARTS)},
    }
    if algorithm in algorithms.ONLINE:
        spec["reward"] = {"type": reward_type, **({"rule": "exact_match"} if reward_type == "rule" else {})}
        if reward_type == "model":
            spec["rewardModel"] = {"path": "/models/rm"}
    spec["scheduling"] = {k: v for k, v in spec["scheduling"].items() if v != ""}
    return {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob",
            "metadata": {"name": draw(JOB_NAMES), "namespace": draw(dns_names(max_size=63))}, "spec": spec}


def role_pods(job: api.Job, attempt: int) -> list[dict[str, Any]]:
    """The first and the last pod of every role with pods (every other pod's names are shorter)."""
    settings_ = builders.BuildSettings()
    return [builders.build_role_pod(job, role, index, attempt, settings_)
            for role in job.spec.pod_roles() for index in sorted({0, role.replicas - 1})]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(manifests())
def test_every_accepted_spec_derives_only_valid_names(manifest):
    crd = api_server_errors(manifest)
    try:
        job = parse_job(manifest)
    except SpecError as err:
        event("refused")
        assert crd, f"parse_job refuses what the CRD accepts: {err}"
        return
    event("accepted")
    assert not crd, f"the CRD refuses what parse_job accepts: {crd}"
    pods = [pod for attempt in sorted({0, job.spec.failure_policy.max_restarts}) for pod in role_pods(job, attempt)]
    problems = [problem for pod in pods for problem in pod_problems(pod)]
    for obj in builders.build_support_objects(job, builders.BuildSettings()):
        problems += support_problems(obj)
    assert not problems, problems
    # Steer the search to the edge: specs whose derived names and label values are the longest.
    longest = max(len(text) for pod in pods for text in (pod["metadata"]["name"], *pod["metadata"]["labels"].values()))
    target(float(longest), label="longest derived pod name or label value")
    event(f"longest derived name or label value: {'60-63' if longest >= 60 else 'under 60'} characters")


@pytest.mark.parametrize("attempt", [0, 7, 10**9])
def test_kueue_group_names_of_long_jobs_stay_label_values_and_distinct(attempt):
    name = "j" * api.MAX_JOB_NAME_LENGTH
    job = parse_job({"metadata": {"name": name}, "spec": {
        "algorithm": "sft", "image": "t", "model": {"path": "tiny://llama"},
        "dataset": {"path": "synthetic://instructions"}, "roles": [{"name": "actor"}], "scheduling": {"queue": "q"}}})
    group = builders.kueue_pod_group_name(job, attempt)
    assert is_label_value(group)
    assert group != builders.kueue_pod_group_name(job, attempt + 1)
    if len(f"{name}-attempt-{attempt}") <= 63:
        assert group == f"{name}-attempt-{attempt}"
