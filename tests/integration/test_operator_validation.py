"""Bad specs against the real API server and the running operator.

- The API server refuses every invalid case of tests/unit/cases/rlhfjob_invalid*.yaml with 422, its
  OpenAPI schema and CEL rules naming the same fields as parse_spec (the unit tier's emulation of
  the API server in test_crd.py is checked here against the real one).
- An update that changes an immutable field is refused by the CRD's transition rules.
- Jobs stored under a looser CRD (an older version without the CEL rules, as after a CRD upgrade)
  are failed by the operator: phase Failed, reason InvalidSpec, a message and a Warning event naming
  every field, no pods; good jobs alongside keep reconciling, and fixing the spec reopens the job.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sys

import pytest
import yaml
from operator_kube import NS, apply, events, example, job, metric, pods, wait_pods
from rlhf_operator import api

from tests.controlplane import kube
from tests.controlplane.fixtures import CHART

sys.path.insert(0, str(CHART.parents[1] / "tests" / "unit"))
import rlhfjob_cases as cases  # noqa: E402  (the invalid-case table the API engineer keeps with test_api.py)

INVALID = cases.load("rlhfjob_invalid.yaml")
INVALID_METADATA = cases.load("rlhfjob_invalid_metadata.yaml")
JOBS = f"/apis/rlhf.dev/v1alpha1/namespaces/{NS}/rlhfjobs"
CRD_FILE = CHART / "crds" / "rlhfjobs.yaml"


# The API server's note that type errors kept it from running the CEL rules (it names no field).
RULES_NOT_CHECKED = "some validation rules were not checked because the object was invalid"


def refusal(cluster, manifest: dict) -> tuple[list[tuple[str, str]], bool]:
    """What the API server says of the manifest as a dry run: ([], True) when it accepts it, else its
    (field, message) errors with field paths as parse_spec writes them (`roles[1].replicas`; a rule on
    the object itself: ``), and whether it ran the CEL rules (it does not once the schema failed).

    Asked with fieldValidation=Warn so that an unknown field (a Warning header; kubectl's default,
    Strict, stops at it with a 400 naming only the unknown fields) comes with every other error of
    the 422, each a cause (a root rule's field reads `<nil>`)."""
    body = {**manifest, "metadata": {**manifest["metadata"], "namespace": NS}}
    warnings: list[str] = []
    errors, checked = [], True
    try:
        kube.api_request(cluster, "POST", f"{JOBS}?dryRun=All&fieldValidation=Warn", body, warnings=warnings)
    except kube.ApiStatusError as err:
        assert err.status == 422, err
        causes = err.body.get("details", {}).get("causes", [])
        checked = not any(RULES_NOT_CHECKED in c.get("message", "") for c in causes)
        errors = [(c.get("field", "").replace("<nil>", ""), c.get("message", "")) for c in causes
                  if RULES_NOT_CHECKED not in c.get("message", "")]
        assert errors, err.body
    errors += [(field, "unknown field") for w in warnings for field in re.findall(r'unknown field \\?"([^"\\]+)', w)]
    return [(f.removeprefix("spec.").removeprefix("spec"), m) for f, m in errors], checked


def corrected(manifest: dict, base: str, fields: list[str]) -> dict:
    """The manifest with each named field put back as in the base example (removed if it has none)."""
    fixed = copy.deepcopy(manifest)
    original = cases.example(base)["spec"]
    for field in fields:
        try:
            cases.set_path(fixed["spec"], field, copy.deepcopy(cases.get_path(original, field)))
        except (KeyError, IndexError):
            with contextlib.suppress(KeyError, IndexError):  # a missing field: nothing to remove
                cases.unset_path(fixed["spec"], field)
    return fixed


def test_at_least_twenty_invalid_cases_are_known():
    assert len(INVALID) >= 20


@pytest.mark.parametrize("case", cases.params("rlhfjob_invalid.yaml"))
def test_the_api_server_refuses_each_invalid_case_at_the_fields_parse_spec_names(cluster, case):
    manifest = cases.build(case)
    manifest["metadata"] = {"name": "bad"}
    server, checked = refusal(cluster, manifest)
    assert server, "the API server accepts what parse_spec rejects"
    if not checked:
        # Schema errors keep the API server from running the CEL rules ("correct the existing errors
        # to complete validation"); test_crd's emulation runs them unless a field has the wrong type.
        # Do as the message says, then collect what the rules add.
        server += refusal(cluster, corrected(manifest, case["base"], [f for f, _ in server]))[0]
    paths = [path for path, _ in case["errors"]]
    for path in paths:
        assert any(cases.related(path, field) for field, _ in server), f"{path} has no twin in {server}"
    known = paths + case.get("crd_extra", [])
    for field, message in server:
        assert any(cases.related(field, p) for p in known), f"API server {field}: {message} has no parse_spec twin"


@pytest.mark.parametrize("case", cases.params("rlhfjob_invalid_metadata.yaml"))
def test_the_api_server_refuses_job_names_too_long_for_pod_hostnames(cluster, case):
    server, _ = refusal(cluster, cases.build(case))
    expected = {p for p, _ in case["errors"]}
    # A rule on the root reports no field under spec: its message names metadata.name instead.
    assert any("metadata.name " in m for _, m in server), server
    spec_fields = {f for f, _ in server if f and f != "metadata.name" and "metadata.name" not in f}
    assert spec_fields == expected - {"metadata.name"}, server


def test_a_fifty_character_job_name_is_accepted(cluster):
    assert refusal(cluster, cases.build({"base": "sft-tiny", "name": "j" * 50})) == ([], True)


def test_an_immutable_change_is_refused_by_the_api_server(cluster, operator):
    name = "val-immutable"
    apply(cluster, example("rm-tiny.yaml", name))
    wait_pods(cluster, name, 1)
    changed = example("sft-tiny.yaml", name)  # same single actor role, other algorithm
    result = apply(cluster, changed, check=False)
    assert result.returncode != 0 and "spec.algorithm" in result.stderr and "immutable" in result.stderr, result.stderr
    assert job(cluster, name)["spec"]["algorithm"] == "rm"
    assert set(pods(cluster, name)) == {f"{name}-actor-0"}
    kube.kubectl(cluster, "delete", "rlhfjob", name, "-n", NS, "--wait=false")


# --- the operator's own guard: jobs that got in under a looser CRD ---------------------------------------


def without_cel(node):
    """The CRD with every x-kubernetes-validations rule removed (a version before the CEL rules)."""
    if isinstance(node, dict):
        return {k: without_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [without_cel(v) for v in node]
    return node


def replace_crd(cluster, crd: dict) -> None:
    current = kube.get_json(cluster, "crd", crd["metadata"]["name"])
    body = copy.deepcopy(crd)
    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    kube.kubectl(cluster, "replace", "-f", "-", input=json.dumps(body))


@pytest.fixture
def loose_crd(cluster):
    """The RLHFJob CRD without its CEL rules until the test has stored its jobs; the chart's CRD back after."""
    strict = yaml.safe_load(CRD_FILE.read_text())
    probe = cases.build({"base": "ppo-tiny", "set": {"roles[0].colocateWith": "critic"}})  # refused by CEL only
    replace_crd(cluster, without_cel(strict))
    kube.wait_for(lambda: refusal(cluster, probe)[0] == [], timeout=30, interval=0.2, what="the loose CRD in force")

    def restore() -> None:
        replace_crd(cluster, strict)
        kube.wait_for(lambda: refusal(cluster, probe)[0] != [], timeout=30, interval=0.2, what="the chart's CRD back")

    yield restore
    restore()


def invalid_condition(obj) -> dict | None:
    conditions = (obj or {}).get("status", {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Failed" and c["reason"] == "InvalidSpec"), None)


def test_jobs_stored_under_a_looser_crd_are_failed_by_the_operator_naming_each_field(cluster, operator, loose_crd):
    stored = []
    for i, case in enumerate(INVALID):
        manifest = cases.build(case)
        manifest["metadata"] = {"name": f"bad-{i:02d}", "namespace": NS}
        if refusal(cluster, manifest)[0] == []:  # what only the CEL rules refuse
            kube.api_request(cluster, "POST", JOBS, manifest)
            stored.append((case, manifest["metadata"]["name"]))
    good = example("dpo-tiny.yaml", "val-good")
    apply(cluster, good)
    loose_crd()  # the CRD is upgraded: the stored jobs stay as they are
    assert len(stored) >= 10, [c["id"] for c, _ in stored]
    for case, name in stored:
        paths = [path for path, _ in case["errors"]]
        failed = kube.wait_for(lambda n=name: invalid_condition(job(cluster, n)), timeout=60,
                               what=f"{case['id']} Failed/InvalidSpec")
        assert job(cluster, name)["status"]["phase"] == "Failed"
        for path in paths:
            assert f"spec.{path}" in failed["message"], (case["id"], failed["message"])
        warnings = [e for e in events(cluster, name) if e["type"] == "Warning" and e["reason"] == "InvalidSpec"]
        assert len(warnings) == 1 and f"spec.{paths[0]}" in warnings[0]["message"], case["id"]
        assert not pods(cluster, name), case["id"]
    assert len(wait_pods(cluster, "val-good", 2)) == 2
    assert metric(operator, "rlhf_operator_jobs_failed_total", reason="InvalidSpec") == len(stored)
    # Fixing a failed job's spec reopens it: a new generation is parsed again and gets its pods.
    # (Not a case about an immutable field: the CRD's transition rules keep those as stored.)
    immutable = ("algorithm", "roles", *api.IMMUTABLE_FIELDS)
    case, name = next((c, n) for c, n in stored
                      if not any(k.startswith(immutable) for k in [*(c.get("set") or {}), *(c.get("unset") or [])]))
    fixed = cases.example(case["base"])["spec"]
    kube.kubectl(cluster, "patch", "rlhfjob", name, "-n", NS, "--type=json",
                 "-p", json.dumps([{"op": "replace", "path": "/spec", "value": fixed}]))
    kube.wait_for(lambda: pods(cluster, name), timeout=30, what=f"{case['id']} reopened with pods")
    kube.kubectl(cluster, "delete", "rlhfjob", "-n", NS, "val-good", *[n for _, n in stored], "--wait=false")
