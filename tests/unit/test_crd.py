"""crds/rlhfjobs.yaml: shape, drift against rlhf_operator.api, and agreement with parse_spec.

The API server is emulated in three steps, as kube-apiserver orders them: prune nulls and apply
the schema's defaults; validate with the openAPIV3Schema (as JSON schema, unknown fields rejected
like kubectl's strict field validation); then evaluate every x-kubernetes-validations CEL rule
with cel-python (skipped when there are type errors, which block CEL in the API server too).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import celpy
import jsonschema
import pytest
import rlhfjob_cases as cases
import yaml
from rlhf_contract import algorithms, config
from rlhf_contract.config import Hyperparameters
from rlhf_operator import api, constants
from rlhf_operator.api import SpecError, immutable_changes, parse_job, parse_spec
from rlhfjob_cases import related, to_json_schema

CRD = cases.crd()
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
SPEC = SCHEMA["properties"]["spec"]
ROLE = SPEC["properties"]["roles"]["items"]
HYPERPARAMETERS = SPEC["properties"]["hyperparameters"]["properties"]
_CEL = celpy.Environment()


# --- the emulated API server ------------------------------------------------------------------------


def prune_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [prune_nulls(v) for v in value]
    return value


def apply_defaults(schema: dict[str, Any], value: Any) -> None:
    """Structural defaulting: a missing property with a default gets it, then nested defaults."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            apply_defaults(schema["items"], item)


def _path(steps: Any) -> str:
    """jsonschema's absolute_path -> a path like parse_spec's (`spec.roles[1].replicas`)."""
    out = ""
    for step in steps:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(to_json_schema(SCHEMA))


@functools.cache
def _program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


def schema_errors(obj: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(path, validator, message) for every schema violation."""
    return [(_path(e.absolute_path), e.validator, e.message) for e in _validator().iter_errors(obj)]


def _cel_value(schema: dict[str, Any], value: Any) -> Any:
    """JSON -> CEL: `type: number` fields are doubles in the API server even when written as 3."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return {k: _cel_value(props.get(k) or (extra if isinstance(extra, dict) else {}), v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_cel_value(schema.get("items", {}), v) for v in value]
    return value


def cel_errors(schema: dict[str, Any], value: Any, path: str = "", old: Any = None) -> list[tuple[str, str]]:
    """Evaluate every CEL rule under `schema` against `value` (and `old` for transition rules)."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue  # transition rules only run on updates, against a correlated old value
        activation = {"self": celpy.json_to_cel(_cel_value(schema, value))}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(_cel_value(schema, old))
        try:
            ok = bool(_program(rule["rule"]).evaluate(activation))
        except Exception as e:  # noqa: BLE001 - an evaluation error rejects the object, as in the API server
            ok, rule = False, {**rule, "message": f"{rule['message']} (evaluation error: {e})"}
        if not ok:
            at = path + rule.get("fieldPath", "")
            errors.append((at.lstrip("."), rule["message"]))
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                old_sub = old.get(key) if isinstance(old, dict) else None
                errors += cel_errors(sub, value[key], f"{path}.{key}", old_sub)
    elif isinstance(value, list) and "items" in schema:
        keys = schema.get("x-kubernetes-list-map-keys", [])
        for i, item in enumerate(value):
            # Items of a map list correlate with the old item of the same key, others never do.
            old_item = next((o for o in old or [] if keys and all(o.get(k) == item.get(k) for k in keys)), None)
            errors += cel_errors(schema["items"], item, f"{path}[{i}]", old_item)
    return errors


def api_server_errors(manifest: dict[str, Any], old: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """What `kubectl apply` of this manifest would be told: [] when accepted."""
    obj = prune_nulls(copy.deepcopy(manifest))
    apply_defaults(SCHEMA, obj)
    found = schema_errors(obj)
    errors = [(path, message) for path, _, message in found]
    if not any(kind == "type" for _, kind, _ in found):  # type errors block CEL evaluation
        if old is not None:
            old = prune_nulls(copy.deepcopy(old))
            apply_defaults(SCHEMA, old)
        errors += cel_errors(SCHEMA, obj, "", old)
    # Paths under spec as parse_spec writes them; status paths keep their prefix.
    return [(p.removeprefix("spec.").removeprefix("spec"), m) for p, m in errors]


# --- the CRD's shape ------------------------------------------------------------------------------------


def test_names_scope_and_versions_match_the_constants():
    assert CRD["metadata"]["name"] == f"{constants.PLURAL}.{constants.GROUP}"
    spec = CRD["spec"]
    assert spec["group"] == constants.GROUP and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == constants.KIND and spec["names"]["plural"] == constants.PLURAL
    assert spec["names"]["shortNames"] == [constants.SHORT_NAME]
    assert spec["names"]["categories"] == ["all", "rlhf"]
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [(constants.VERSION, True, True)]
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns():
    columns = [(c["name"], c["jsonPath"], c["type"]) for c in VERSION["additionalPrinterColumns"]]
    assert columns == [
        ("Phase", ".status.phase", "string"),
        ("Algorithm", ".spec.algorithm", "string"),
        ("Step", ".status.progress.step", "integer"),
        ("Reward", ".status.progress.rewardMean", "number"),
        ("Restarts", ".status.restarts", "integer"),
        ("Waiting-For", ".status.waitingFor", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ]


def _walk(node: Any, path: str = ""):
    yield path, node
    if isinstance(node, dict):
        for key, sub in node.get("properties", {}).items():
            yield from _walk(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from _walk(node[key], f"{path}[]")


def test_schema_is_structural():
    """Every node has a type (or int-or-string / preserve-unknown), as apiextensions/v1 demands."""
    for path, node in _walk(SCHEMA):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ({"anyOf", "oneOf", "allOf", "not"} & set(node)), f"{path} uses a non-structural keyword"


def test_every_duration_of_the_spec_has_a_maximum_its_clocks_hold():
    """A duration without one (distributedTimeoutSeconds: 1e15) passed validation and then overflowed a
    timedelta in every trainer process, restart after restart. Kubernetes' own tolerationSeconds is the
    API server's to check; the planner's and trainer's clocks take each maximum (test_planner.py)."""
    durations = [(p, n) for p, n in _walk(SPEC)
                 if "Seconds" in p.rsplit(".", 1)[-1] and not p.endswith("tolerationSeconds")]
    assert len(durations) == 6, [p for p, _ in durations]  # a new one is a duration too
    for path, node in durations:
        assert node["type"] == "integer" and node.get("maximum") is not None, path
        assert node["maximum"] <= api.MAX_DURATION_SECONDS, path


def test_every_spec_section_is_described():
    undocumented = [p for p, n in _walk(SPEC) if isinstance(n, dict) and n.get("type") == "object"
                    and "properties" in n and "description" not in n and p.count(".") == 1]
    assert not undocumented, undocumented


def test_every_cel_rule_compiles_and_has_a_message():
    rules = [r for _, n in _walk(SCHEMA) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 15
    for rule in rules:
        _CEL.compile(rule["rule"])
        assert rule["message"]


def test_cel_cost_is_bounded_strings_in_list_rules_have_max_length():
    """The API server estimates rule cost from maxLength/maxItems; unbounded strings inside list
    rules blow the budget and the CRD is refused."""
    assert SPEC["properties"]["roles"]["maxItems"] == len(algorithms.ROLE_NAMES)
    for field in ("name", "colocateWith"):
        assert ROLE["properties"][field]["maxLength"] <= 64


def test_transition_rules_guard_algorithm_and_role_layout():
    assert {"rule": "self == oldSelf", "message": "algorithm is immutable"} in \
        SPEC["properties"]["algorithm"]["x-kubernetes-validations"]
    assert any("oldSelf" in r["rule"] for r in SPEC["properties"]["roles"]["x-kubernetes-validations"])


# --- drift against rlhf_operator.api and rlhf_contract (generated blocks: tests/unit/test_contract.py) ---


@pytest.mark.parametrize(("node", "constant"), [
    pytest.param(SPEC["properties"]["algorithm"], algorithms.NAMES, id="algorithm"),
    pytest.param(ROLE["properties"]["name"], algorithms.ROLE_NAMES, id="role-name"),
    pytest.param(SPEC["properties"]["reward"]["properties"]["type"], algorithms.REWARD_TYPES, id="reward-type"),
    pytest.param(SPEC["properties"]["reward"]["properties"]["rule"], config.REWARD_RULES, id="reward-rule"),
    pytest.param(SPEC["properties"]["dataset"]["properties"]["format"], config.DATASET_FORMATS, id="dataset-format"),
    pytest.param(SPEC["properties"]["scheduling"]["properties"]["gangScheduler"], api.GANG_SCHEDULERS,
                 id="gang-scheduler"),
    pytest.param(SPEC["properties"]["imagePullPolicy"], api.PULL_POLICIES, id="pull-policy"),
    pytest.param(HYPERPARAMETERS["lossType"], config.LOSS_TYPES, id="loss-type"),
    pytest.param(HYPERPARAMETERS["klEstimator"], config.KL_ESTIMATORS, id="kl-estimator"),
    pytest.param(SCHEMA["properties"]["status"]["properties"]["phase"], api.PHASES, id="phase"),
    pytest.param(SCHEMA["properties"]["status"]["properties"]["conditions"]["items"]["properties"]["type"],
                 api.CONDITION_TYPES, id="condition-type"),
    pytest.param(ROLE["properties"]["tolerations"]["items"]["properties"]["operator"], api.TOLERATION_OPERATORS,
                 id="toleration-operator"),
])
def test_enums_match_the_api_constants(node, constant):
    assert tuple(node["enum"]) == constant


def test_patterns_match_parse_spec():
    volume = SPEC["properties"]["checkpoint"]["properties"]["volume"]
    assert volume["properties"]["size"]["pattern"] == api.QUANTITY_PATTERN
    for key in ("model", "rewardModel"):
        from_job = SPEC["properties"][key]["properties"]["fromJob"]
        assert (from_job["pattern"], from_job["maxLength"]) == (api.DNS_1035_LABEL, api.MAX_JOB_NAME_LENGTH)
    [callable_rule] = [r for r in SPEC["properties"]["reward"]["x-kubernetes-validations"] if "callable" in r["rule"]]
    assert f"matches('{config.CALLABLE_PATTERN}')" in callable_rule["rule"]


@pytest.mark.parametrize("name", cases.example_names())
def test_crd_defaults_mean_what_parse_spec_defaults_mean(name):
    """parse_spec of a manifest == parse_spec of it after the API server applied the CRD defaults."""
    manifest = cases.example(name)
    defaulted = copy.deepcopy(manifest)
    apply_defaults(SCHEMA, defaulted)
    assert defaulted != manifest  # something was defaulted, so the comparison means something
    assert parse_spec(defaulted["spec"]) == parse_spec(manifest["spec"])


def test_defaulting_an_empty_spec_fills_every_section():
    obj = {"spec": {"roles": [{"name": "actor"}]}}
    apply_defaults(SCHEMA, obj)
    spec = obj["spec"]
    assert spec["hyperparameters"]["maxSteps"] == Hyperparameters().max_steps
    assert spec["checkpoint"]["volume"] == {"retain": True}  # no size: existingClaim XOR size
    assert spec["reward"] == {"type": "model", "normalizeSteps": True}
    assert spec["roles"][0]["deepspeed"] == {"bf16": False, "offloadOptimizer": False, "gradientCheckpointing": False}
    assert "gangScheduler" not in spec["scheduling"]  # unset = the operator's default


# --- the CRD and parse_spec agree -------------------------------------------------------------------------


@pytest.mark.parametrize("name", cases.example_names())
def test_every_example_passes_the_api_server(name):
    assert api_server_errors(cases.example(name)) == []


@pytest.mark.parametrize("case", cases.params("rlhfjob_valid.yaml"))
def test_valid_variants_pass_the_api_server(case):
    assert api_server_errors(cases.build(case)) == []


@pytest.mark.parametrize("case", cases.params("rlhfjob_invalid.yaml"))
def test_invalid_cases_are_rejected_by_the_api_server_where_parse_spec_rejects_them(case):
    manifest = cases.build(case)
    crd = api_server_errors(manifest)
    with pytest.raises(SpecError) as raised:
        parse_spec(manifest["spec"])
    assert crd, "the CRD accepts what parse_spec rejects"
    for path, message in raised.value.errors:
        assert any(related(path, p) for p, _ in crd), f"parse_spec {path}: {message} has no CRD twin in {crd}"
    known = [p for p, _ in raised.value.errors] + case.get("crd_extra", [])
    for path, message in crd:
        assert any(related(path, p) for p in known), f"CRD {path}: {message} has no parse_spec twin"


@pytest.mark.parametrize("case", cases.params("rlhfjob_invalid_metadata.yaml"))
def test_long_job_names_are_rejected_by_the_api_server_as_by_parse_job(case):
    manifest = cases.build(case)
    crd = api_server_errors(manifest)
    with pytest.raises(SpecError) as raised:
        parse_job(manifest)
    # A root rule reports no field path: its message names metadata.name instead.
    name_errors = [m for p, m in crd if p == "" and m.startswith("metadata.name ")]
    assert bool(name_errors) == any(p == "metadata.name" for p, _ in raised.value.errors), crd
    spec_paths = [p for p, _ in raised.value.errors if p != "metadata.name"]
    assert sorted(p for p, _ in crd if p) == sorted(spec_paths)


def test_a_fifty_five_character_job_name_passes_the_api_server():
    assert api_server_errors(cases.build({"base": "sft-tiny", "name": "j" * 55})) == []


@pytest.mark.parametrize("path", sorted((cases.CASES / "user_reports").glob("job-*.yaml")), ids=lambda p: p.stem)
def test_user_reported_job_names_are_refused_by_the_api_server(path):
    errors = api_server_errors(yaml.safe_load(path.read_text()))
    assert [p for p, _ in errors] == [""]
    assert errors[0][1].startswith("metadata.name must be a DNS-1035 label")


def test_cel_rule_messages_name_the_allowed_values():
    manifest = cases.build({"base": "grpo-tiny", "unset": ["reward.rule"]})
    assert ("reward.rule", "rule is required when type is rule; must be one of: exact_match, regex, callable") \
        in api_server_errors(manifest)


# --- updates: immutability ---------------------------------------------------------------------------------


def _changed(base: str, **sets: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    old = cases.example(base)
    return old, cases.build({"base": base, "set": sets})


@pytest.mark.parametrize(("base", "sets", "immutable"), [
    pytest.param("ppo-tiny", {"hyperparameters.maxSteps": 40}, False, id="max-steps"),
    pytest.param("ppo-tiny", {"roles[0].replicas": 2, "suspend": True}, False, id="replicas-and-suspend"),
    pytest.param("dpo-tiny", {"algorithm": "grpo", "reward": {"type": "rule", "rule": "exact_match"}}, True,
                 id="algorithm"),
    pytest.param("ppo-tiny", {"roles[2].colocateWith": "actor"}, True, id="colocate-added"),
    pytest.param("sft-tiny", {"roles": [{"name": "actor", "replicas": 2}]}, False, id="roles-rewritten-same-layout"),
    # issue 18, part 3: each field is either immutable (with how to change it) or rolled out / applied
    pytest.param("ppo-tiny", {"model.path": "tiny://qwen2"}, "model", id="model"),
    pytest.param("grpo-tiny", {"reward.rule": "regex", "reward.pattern": "7"}, "reward", id="reward"),
    pytest.param("sft-tiny", {"dataset.path": "synthetic://arithmetic"}, "dataset", id="dataset"),
    pytest.param("sft-tiny", {"checkpoint.volume.size": "2Gi"}, "checkpoint.volume", id="checkpoint-volume"),
    pytest.param("sft-tiny", {"scheduling.gangScheduler": "volcano"}, "scheduling.gangScheduler",
                 id="gang-scheduler"),
    pytest.param("sft-tiny", {"hyperparameters.learningRate": 0.5, "image": "trainer:2"}, False,
                 id="rolled-out-learning-rate-and-image"),
    pytest.param("sft-tiny", {"checkpoint.intervalSteps": 3, "scheduling.queue": "q",
                              "terminationGracePeriodSeconds": 120}, False, id="rolled-out-interval-queue-grace"),
    pytest.param("sft-tiny", {"failurePolicy.maxRestarts": 9, "scheduling.gangTimeoutSeconds": 60}, False,
                 id="applied-in-place-failure-policy"),
])
def test_updates_agree_with_immutable_changes(base, sets, immutable):
    old, new = _changed(base, **sets)
    crd = [e for e in api_server_errors(new, old=old) if "immutable" in e[1]]
    changes = immutable_changes(old["spec"], new["spec"])
    assert bool(crd) == bool(immutable) == bool(changes), (crd, changes)
    if isinstance(immutable, str):  # both name the field, and say how to change it anyway
        assert [p for p, _ in changes] == [immutable]
        assert any(p == immutable or m.startswith(immutable) for p, m in crd), crd
        assert "create a new job" in changes[0][1]
    assert api_server_errors(new) == []  # valid as a new object: only the update is refused


def test_role_layout_change_is_refused_even_when_the_names_stay():
    old, new = _changed("ppo-tiny", **{"roles[1].colocateWith": "actor"})
    assert ("roles", "the role layout (role names and colocateWith) is immutable") in api_server_errors(new, old=old)


# --- status ----------------------------------------------------------------------------------------------------


def test_status_written_by_the_operator_validates():
    obj = cases.example("ppo-tiny")
    obj["status"] = {
        "phase": "Running", "observedGeneration": 2, "restarts": 1,
        "startTime": "2026-01-01T00:00:00Z", "lastRestartTime": "2026-01-01T00:05:00Z",
        "gangCreatedTime": "2026-01-01T00:05:10Z", "gangTimeouts": 1, "runningTime": "2026-01-01T00:01:00Z",
        "podsNotStarting": [{"name": "j-actor-0", "reason": "ImagePullBackOff", "message": "Back-off pulling"}],
        "attempt": 2, "disruptions": 1, "specHash": "0ea93b7df9b1fcf7",
        "roles": {"actor": {"desired": 1, "pending": 0, "running": 1, "succeeded": 0, "failed": 0}},
        "progress": {"step": 3, "rewardMean": 0.4, "kl": 0.01, "lastCheckpointStep": 2,
                     "updatedAt": "2026-01-01T00:06:00Z"},
        "conditions": [{"type": "Running", "status": "True", "reason": "AllPodsRunning", "message": "",
                        "lastTransitionTime": "2026-01-01T00:01:00Z"}],
    }
    assert api_server_errors(obj) == []
    obj["status"]["phase"] = "Exploded"
    assert [p for p, _, _ in schema_errors(obj)] == ["status.phase"]


# --- the role matrix: CEL role rules == required_roles() ------------------------------------------------


def _role_matrix():
    for algorithm in algorithms.NAMES:
        for reward_type in algorithms.REWARD_TYPES:
            required = algorithms.required_roles(algorithm, reward_type)
            yield pytest.param(algorithm, reward_type, list(required), True, id=f"{algorithm}-{reward_type}-exact")
            for name in algorithms.ROLE_NAMES:
                toggled = [r for r in required if r != name] if name in required else [*required, name]
                verb = "without" if name in required else "with"
                yield pytest.param(algorithm, reward_type, toggled, False, id=f"{algorithm}-{reward_type}-{verb}-{name}")


@pytest.mark.parametrize(("algorithm", "reward_type", "role_names", "valid"), list(_role_matrix()))
def test_role_rules_match_required_roles(algorithm, reward_type, role_names, valid):
    reward = {"type": reward_type, **({"rule": "exact_match"} if reward_type == "rule" else {})}
    manifest = {"apiVersion": constants.API_VERSION, "kind": constants.KIND, "metadata": {"name": "m"},
                "spec": {"algorithm": algorithm, "image": "trainer:1", "model": {"path": "tiny://llama"},
                         "rewardModel": {"path": "/models/rm"}, "reward": reward,
                         "dataset": {"path": "synthetic://arithmetic"},
                         "roles": [{"name": n} for n in role_names]}}
    crd = api_server_errors(manifest)
    try:
        parse_spec(manifest["spec"])
        parsed = []
    except SpecError as e:
        parsed = e.errors
    assert (not crd) == (not parsed) == valid, (crd, parsed)


def test_every_status_the_planner_writes_is_kept_by_the_crd():
    """The API server prunes status fields its schema does not list: a key the planner writes but the CRD
    lacks would be lost on every write (e.g. specHash, and with it every rollout)."""
    from datetime import timedelta

    import test_planner as tp
    from rlhf_operator import planner

    for name, case in tp.CASES.items():
        job = tp.make_job(status=case.status, generation=case.generation, **case.spec)
        plan = planner.plan(job, planner.Observed(case.pods, case.existing), tp.T0 + timedelta(seconds=case.at),
                            tp.SETTINGS)
        obj = {**cases.example("ppo-tiny"), "status": plan.status}
        assert [e for e in schema_errors(obj) if e[0].startswith("status")] == [], name
