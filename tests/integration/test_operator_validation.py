"""Bad specs against the running operator: every invalid case of tests/unit/cases/rlhfjob_invalid.yaml
is rejected, by the CRD schema (422 from `kubectl apply`, naming the field) or by the operator
(phase Failed, reason InvalidSpec, a message and a Warning event naming the field), while good jobs
alongside keep reconciling."""

from __future__ import annotations

import json
import re
import sys

from operator_kube import NS, apply, events, example, job, metric, pods, wait_phase, wait_pods

from tests.kube_emulator import harness

sys.path.insert(0, str(harness.HERE.parent / "unit"))
import rlhfjob_cases  # noqa: E402  (the invalid-case table the API engineer keeps with test_api.py)

INVALID = rlhfjob_cases.load("rlhfjob_invalid.yaml")


def schema_path(path: str) -> str:
    """The field as the API server's schema errors name it: `spec.roles[1].replicas`."""
    return f"spec.{path}"


def invalid_condition(obj) -> dict | None:
    conditions = (obj or {}).get("status", {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Failed" and c["reason"] == "InvalidSpec"), None)


def test_at_least_twenty_invalid_cases_are_known():
    assert len(INVALID) >= 20


def test_every_invalid_manifest_is_rejected_naming_its_field(emulator, operator):
    manifests = []
    for i, case in enumerate(INVALID):
        manifest = rlhfjob_cases.build(case)
        manifest["metadata"] = {"name": f"bad-{i:02d}", "namespace": NS}
        manifests.append(manifest)
    # One kubectl for all: it applies what the server accepts and reports each rejected object.
    # JSON, not YAML: PyYAML would write the string "1e-5" bare, which kubectl reads as a number.
    result = harness.kubectl(emulator, "apply", "--validate=false", "-n", NS, "-f", "-", check=False,
                             input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))
    rejected = {m.group(1): line for line in result.stderr.splitlines()
                if (m := re.search(r'"(bad-\d\d)" is invalid', line))}
    by_schema = by_operator = 0
    for case, manifest in zip(INVALID, manifests, strict=True):
        name = manifest["metadata"]["name"]
        paths = [path for path, _ in case["errors"]]
        if name in rejected:
            line = rejected[name]
            assert any(schema_path(p) in line for p in paths), (case["id"], line)
            by_schema += 1
            continue
        failed = harness.wait_for(lambda n=name: invalid_condition(job(emulator, n)), timeout=30,
                                  what=f"{case['id']} Failed/InvalidSpec")
        assert job(emulator, name)["status"]["phase"] == "Failed"
        for path in paths:
            assert f"spec.{path}" in failed["message"], (case["id"], failed["message"])
        warnings = [e for e in events(emulator, name) if e["type"] == "Warning" and e["reason"] == "InvalidSpec"]
        assert len(warnings) == 1 and f"spec.{paths[0]}" in warnings[0]["message"], case["id"]
        assert not pods(emulator, name), case["id"]
        by_operator += 1
    assert by_schema + by_operator == len(INVALID)
    assert by_schema and by_operator  # both layers took part
    assert metric(operator, "rlhf_operator_jobs_failed_total", reason="InvalidSpec") == by_operator
    harness.kubectl(emulator, "delete", "-n", NS, "rlhfjob", *[m["metadata"]["name"] for m in manifests
                                                              if m["metadata"]["name"] not in rejected])


def test_a_bad_job_fails_while_a_good_one_alongside_reconciles(emulator, operator):
    bad = example("ppo-tiny.yaml", "val-bad")
    bad["spec"]["roles"] = [r for r in bad["spec"]["roles"] if r["name"] != "critic"]  # ppo needs a critic
    apply(emulator, bad)
    apply(emulator, example("dpo-tiny.yaml", "val-good"))
    assert len(wait_pods(emulator, "val-good", 2)) == 2
    failed = wait_phase(emulator, "val-bad", "Failed")
    assert "spec.roles" in invalid_condition(failed)["message"]
    assert failed["status"]["observedGeneration"] == failed["metadata"]["generation"]
    assert not pods(emulator, "val-bad")
    # fixing the spec reopens the job: a new generation is parsed again and gets its pods
    good_roles = example("ppo-tiny.yaml", "val-bad")["spec"]["roles"]
    harness.kubectl(emulator, "patch", "rlhfjob", "val-bad", "-n", NS, "--type=merge",
                    "-p", json.dumps({"spec": {"roles": good_roles}}))
    assert len(wait_pods(emulator, "val-bad", 3)) == 3


def test_an_immutable_change_is_refused_with_an_event(emulator, operator):
    name = "val-immutable"
    apply(emulator, example("rm-tiny.yaml", name))
    wait_pods(emulator, name, 1)
    changed = example("sft-tiny.yaml", name)  # same single actor role, other algorithm
    apply(emulator, changed)  # the emulator has no CEL: the operator is the only guard here
    event = harness.wait_for(
        lambda: next((e for e in events(emulator, name) if e["reason"] == "ImmutableFieldChanged"), None),
        what="ImmutableFieldChanged event")
    assert event["type"] == "Warning" and "spec.algorithm" in event["message"]
    assert set(pods(emulator, name)) == {f"{name}-actor-0"}
    assert job(emulator, name)["status"]["phase"] != "Failed"
