"""parse_spec / parse_job / immutable_changes: defaults, every invalid case, all errors at once."""

from __future__ import annotations

import dataclasses

import pytest
import rlhfjob_cases as cases
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from rlhf_contract import algorithms
from rlhf_contract.config import DatasetConfig, DeepSpeedConfig, Hyperparameters, RewardConfig
from rlhf_contract.knobs import camel_case, settings_of
from rlhf_operator import api
from rlhf_operator.api import SpecError, immutable_changes, parse_job, parse_spec

MINIMAL = {
    "algorithm": "ppo",
    "image": "trainer:1",
    "model": {"path": "tiny://llama"},
    "rewardModel": {"path": "/models/rm"},
    "dataset": {"path": "synthetic://arithmetic"},
    "roles": [{"name": "actor"}, {"name": "critic"}, {"name": "reference"}, {"name": "reward"}],
}


def errors_of(spec: object) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)  # type: ignore[arg-type]
    return raised.value.errors


# --- defaults ------------------------------------------------------------------------------------


def test_minimal_spec_gets_every_default():
    spec = parse_spec(MINIMAL)
    assert spec.image_pull_policy == "IfNotPresent"
    assert spec.reward == RewardConfig(type="model")
    assert spec.reward_model == api.ModelSource(path="/models/rm")
    assert spec.dataset == DatasetConfig(path="synthetic://arithmetic", format="auto", eval_path="", template="auto")
    assert spec.hyperparameters == Hyperparameters()
    assert spec.checkpoint == api.CheckpointSpec(interval_steps=10, keep=3, volume=api.VolumeSpec(size="10Gi"))
    assert spec.scheduling == api.SchedulingSpec(gang_scheduler="", gang_timeout_seconds=300)
    assert spec.failure_policy == api.FailurePolicy(max_restarts=3, backoff_seconds=10)
    assert (spec.suspend, spec.active_deadline_seconds, spec.ttl_seconds_after_finished) == (False, 0, 0)
    actor = spec.role("actor")
    assert (actor.replicas, actor.gpus, actor.image, actor.colocate_with) == (1, 0, "", "")
    assert (actor.resources, actor.node_selector, actor.tolerations) == ({}, {}, [])


@pytest.mark.parametrize(("role", "zero_stage"), [
    pytest.param("actor", 2, id="actor-trains-zero2"),
    pytest.param("critic", 2, id="critic-trains-zero2"),
    pytest.param("reward", 0, id="reward-frozen-zero0"),
    pytest.param("reference", 0, id="reference-frozen-zero0"),
])
def test_zero_stage_default_depends_on_whether_the_role_trains(role, zero_stage):
    assert parse_spec(MINIMAL).role(role).deepspeed == DeepSpeedConfig(zero_stage=zero_stage)


def test_explicit_zero_stage_wins_over_the_role_default():
    spec = dict(MINIMAL, roles=[{"name": "actor"}, {"name": "critic"}, {"name": "reward"},
                                {"name": "reference", "deepspeed": {"zeroStage": 3, "bf16": True}}])
    assert parse_spec(spec).role("reference").deepspeed == DeepSpeedConfig(zero_stage=3, bf16=True)


@pytest.mark.parametrize(("volume", "expected"), [
    pytest.param({}, api.VolumeSpec(size="10Gi"), id="nothing-new-10Gi-claim"),
    pytest.param({"size": "50Gi", "storageClassName": "fast"},
                 api.VolumeSpec(size="50Gi", storage_class_name="fast"), id="sized-claim"),
    pytest.param({"existingClaim": "ckpt"}, api.VolumeSpec(size="", existing_claim="ckpt"), id="existing-claim-no-size"),
    pytest.param({"retain": False}, api.VolumeSpec(retain=False), id="not-retained"),
])
def test_checkpoint_volume(volume, expected):
    assert parse_spec(dict(MINIMAL, checkpoint={"volume": volume})).checkpoint.volume == expected


@pytest.mark.parametrize(("algorithm", "reward", "roles"), [
    pytest.param("ppo", "model", ("actor", "critic", "reference", "reward"), id="ppo-model"),
    pytest.param("ppo", "rule", ("actor", "critic", "reference"), id="ppo-rule"),
    pytest.param("grpo", "model", ("actor", "reference", "reward"), id="grpo-model"),
    pytest.param("rloo", "rule", ("actor", "reference"), id="rloo-rule"),
    pytest.param("dpo", "model", ("actor", "reference"), id="dpo-reward-type-irrelevant"),
    pytest.param("rm", "model", ("actor",), id="rm"),
    pytest.param("sft", "rule", ("actor",), id="sft"),
])
def test_required_roles(algorithm, reward, roles):
    assert algorithms.required_roles(algorithm, reward) == roles


def test_hyperparameters_are_read_by_their_manifest_names():
    given = {"maxSteps": 7, "learningRate": 3e-4, "klEstimator": "k3", "whitenAdvantages": False,
             "lossType": "ipo", "labelSmoothing": 0.1, "dualClip": 3, "packing": True}
    hp = parse_spec(dict(MINIMAL, hyperparameters=given)).hyperparameters
    assert (hp.max_steps, hp.learning_rate, hp.kl_estimator, hp.whiten_advantages) == (7, 3e-4, "k3", False)
    assert (hp.loss_type, hp.label_smoothing, hp.dual_clip, hp.packing) == ("ipo", 0.1, 3.0, True)
    assert isinstance(hp.dual_clip, float)  # an integer in YAML is still a float field


def test_camel_case_names_every_hyperparameter_as_the_spec_does():
    names = {camel_case(s.name) for s in settings_of(Hyperparameters)}
    assert {"maxSteps", "learningRate", "microBatchSize", "valueClipRange", "klHorizon"} <= names
    assert len(names) == len(dataclasses.fields(Hyperparameters))  # every field is a knob


def test_role_fields_are_kept():
    role = {"name": "actor", "replicas": 2, "image": "custom:2", "gpus": 8,
            "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"nvidia.com/gpu": 8}},
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "deepspeed": {"zeroStage": 3, "bf16": True, "offloadOptimizer": True, "gradientCheckpointing": True}}
    spec = parse_spec({**MINIMAL, "algorithm": "sft", "roles": [role], "hyperparameters": {"batchSize": 16}})
    actor = spec.role("actor")
    assert (actor.replicas, actor.image, actor.gpus) == (2, "custom:2", 8)
    assert actor.processes_per_pod == 8  # unset: one process per GPU
    assert actor.resources == role["resources"] and actor.node_selector == {"pool": "gpu"}
    assert actor.tolerations == role["tolerations"]
    assert actor.deepspeed == DeepSpeedConfig(3, True, True, True)


@pytest.mark.parametrize("role, expected", [
    ({"name": "actor"}, 1),
    ({"name": "actor", "gpus": 4}, 4),
    ({"name": "actor", "gpus": 4, "processesPerPod": 1}, 1),  # e.g. one process driving 4 GPUs itself
    ({"name": "actor", "processesPerPod": 2}, 2),  # CPU: two gloo ranks per pod
])
def test_processes_per_pod_default_to_the_gpus_else_one(role, expected):
    spec = parse_spec({**MINIMAL, "algorithm": "sft", "roles": [role], "hyperparameters": {"batchSize": 8}})
    assert spec.role("actor").processes_per_pod == expected
    assert spec.placements["actor"].ranks == expected


def test_colocated_roles_have_no_pods_of_their_own():
    roles = [{"name": "actor"}, {"name": "critic"}, {"name": "reference", "colocateWith": "actor"},
             {"name": "reward", "colocateWith": "critic"}]
    spec = parse_spec(dict(MINIMAL, roles=roles))
    assert [r.name for r in spec.pod_roles()] == ["actor", "critic"]
    assert spec.colocated_into("actor") == ("reference",) and spec.colocated_into("critic") == ("reward",)


@pytest.mark.parametrize("name", cases.example_names())
def test_every_example_parses(name):
    manifest = cases.example(name)
    job = parse_job(manifest)
    assert job.name == manifest["metadata"]["name"]
    assert {r.name for r in job.spec.roles} == set(algorithms.required_roles(job.spec.algorithm, job.spec.reward.type))


@pytest.mark.parametrize("case", cases.params("rlhfjob_valid.yaml"))
def test_valid_variants_parse(case):
    parse_spec(cases.build(case)["spec"])


def test_null_is_unset():
    spec = parse_spec({**MINIMAL, "hyperparameters": {"maxSteps": None}, "suspend": None})
    assert spec.hyperparameters.max_steps == Hyperparameters().max_steps and spec.suspend is False


# --- invalid specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases.params("rlhfjob_invalid.yaml") + cases.params("rlhfjob_invalid_metadata.yaml"))
def test_invalid_job_reports_every_error(case):
    with pytest.raises(SpecError) as raised:
        parse_job(cases.build(case))
    errors = raised.value.errors
    expected = [tuple(e) for e in case["errors"]]
    for path, fragment in expected:
        assert any(p == path and fragment in m for p, m in errors), f"no {path}: {fragment!r} in {errors}"
    assert len(errors) == len(expected), f"expected exactly {expected}, got {errors}"


def test_the_invalid_table_is_large_and_names_fields():
    table = cases.load("rlhfjob_invalid.yaml")
    assert len(table) >= 25
    assert len({c["id"] for c in table}) == len(table)


@pytest.mark.parametrize(("spec", "message"), [
    pytest.param(None, "is required", id="none"),
    pytest.param([], "must be an object, got array", id="list"),
    pytest.param("ppo", "must be an object, got string", id="string"),
])
def test_spec_that_is_not_an_object(spec, message):
    errors = errors_of(spec)
    assert any(message in m for _, m in errors), errors


def test_spec_error_message_names_every_field_with_spec_prefix():
    spec = dict(MINIMAL, roles=[{"name": "actor", "replicas": 0}, {"name": "critic"}, {"name": "reference"},
                                {"name": "reward", "gpus": -2}])
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    text = str(raised.value)
    assert "spec.roles[0].replicas: must be >= 1 (got 0)" in text
    assert "spec.roles[3].gpus: must be >= 0 (got -2)" in text
    assert isinstance(raised.value, ValueError)


def test_unknown_field_message_lists_the_known_fields():
    [(path, message)] = errors_of(dict(MINIMAL, checkpoint={"intervalStep": 5}))
    assert path == "checkpoint.intervalStep"
    assert "known fields: intervalSteps, keep, volume" in message


# --- parse_job ---------------------------------------------------------------------------------------


def test_parse_job_reads_identity_spec_and_status():
    obj = {"apiVersion": "rlhf.dev/v1alpha1", "kind": "RLHFJob",
           "metadata": {"name": "j", "namespace": "team-a", "uid": "u-1", "generation": 4,
                        "creationTimestamp": "2026-01-01T00:00:00Z"},
           "spec": MINIMAL, "status": {"phase": "Running", "restarts": 1}}
    job = parse_job(obj)
    assert (job.name, job.namespace, job.uid, job.generation) == ("j", "team-a", "u-1", 4)
    assert job.creation_timestamp == "2026-01-01T00:00:00Z"
    assert job.spec == parse_spec(MINIMAL)
    assert job.status == {"phase": "Running", "restarts": 1}
    job.status["phase"] = "Failed"
    assert obj["status"]["phase"] == "Running"  # a copy: the planner may not write into the API object


def test_parse_job_defaults_for_a_manifest_file():
    job = parse_job({"metadata": {"name": "j"}, "spec": MINIMAL})
    assert (job.namespace, job.uid, job.generation, job.creation_timestamp, job.status) == ("default", "", 1, "", {})


@pytest.mark.parametrize(("length", "valid"), [(1, True), (51, True), (56, False), (253, False)])
def test_job_name_length_limit_keeps_pod_names_within_63_characters(length, valid):
    name = "j" * length
    if valid:
        assert parse_job({"metadata": {"name": name}, "spec": MINIMAL}).name == name
        assert len(f"{name}-reference-0") <= 63
    else:
        with pytest.raises(SpecError) as raised:
            parse_job({"metadata": {"name": name}, "spec": MINIMAL})
        assert raised.value.errors == [("metadata.name", f"must be at most 55 characters (got {length}): pod names "
                                                         "<job>-<role>-<index> are hostnames, at most 63 characters, "
                                                         "and the first is <job>-actor-0")]


@pytest.mark.parametrize("path", sorted((cases.CASES / "user_reports").glob("job-*.yaml")), ids=lambda p: p.stem)
def test_user_reported_job_names_are_refused_naming_metadata_name_and_the_rule(path):
    """Names users applied that a cluster then refused for the job's Service (422, a retry loop)."""
    manifest = yaml.safe_load(path.read_text())
    with pytest.raises(SpecError) as raised:
        parse_job(manifest)
    [(field_path, message)] = raised.value.errors
    assert field_path == "metadata.name"
    assert message.startswith("must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter")
    assert repr(manifest["metadata"]["name"]) in message


def test_parse_spec_alone_does_not_see_the_name():
    """The local runner and the kopf event handler parse a spec without metadata."""
    parse_spec(MINIMAL)


@pytest.mark.parametrize(("roles", "batch_size", "paths"), [
    pytest.param([1, 1, 1, 1], 8, [], id="one-each"),
    pytest.param([4, 4, 2, 1], 8, [], id="others-fewer-or-equal"),
    pytest.param([2, 3, 1, 1], 8, ["roles[1].replicas"], id="critic-more"),
    pytest.param([2, 3, 3, 3], 8, ["roles[1].replicas", "roles[2].replicas", "roles[3].replicas"], id="all-more"),
    pytest.param([3, 1, 1, 1], 9, [], id="nine-over-three"),
    pytest.param([3, 1, 1, 1], 8, ["hyperparameters.batchSize"], id="eight-over-three"),
    pytest.param([4, 5, 1, 1], 6, ["roles[1].replicas", "hyperparameters.batchSize"], id="both"),
    pytest.param([0, 2, 1, 1], 8, ["roles[0].replicas"], id="bad-actor-replicas-no-comparison"),
])
def test_gang_shape_matches_the_trainer_startup_checks(roles, batch_size, paths):
    spec = dict(MINIMAL, roles=[{"name": n, "replicas": r} for n, r in zip(algorithms.ROLE_NAMES, roles, strict=True)],
                hyperparameters={"batchSize": batch_size})
    if not paths:
        parse_spec(spec)
        return
    assert [p for p, _ in errors_of(spec)] == paths


def test_parse_job_reports_name_and_spec_errors_together():
    with pytest.raises(SpecError) as raised:
        parse_job({"metadata": {}, "spec": dict(MINIMAL, image="")})
    assert raised.value.errors == [("metadata.name", "is required"), ("image", "must not be empty")]
    assert str(raised.value) == "metadata.name: is required; spec.image: must not be empty"


# --- immutable fields ---------------------------------------------------------------------------------

BASE_ROLES = [{"name": "actor"}, {"name": "critic"}, {"name": "reference", "colocateWith": "actor"}]


@pytest.mark.parametrize(("new", "paths"), [
    pytest.param({"algorithm": "ppo", "roles": BASE_ROLES}, [], id="unchanged"),
    pytest.param({"algorithm": "ppo", "roles": [{"name": "actor", "replicas": 4, "gpus": 8}, {"name": "critic"},
                                                 {"name": "reference", "colocateWith": "actor"}]},
                 [], id="replicas-and-gpus-may-change"),
    pytest.param({"algorithm": "ppo", "roles": list(reversed(BASE_ROLES))}, [], id="order-is-not-layout"),
    pytest.param({"algorithm": "grpo", "roles": BASE_ROLES}, ["algorithm"], id="algorithm"),
    pytest.param({"algorithm": "ppo", "roles": BASE_ROLES[:2] + [{"name": "reference"}]},
                 ["roles"], id="colocation-removed"),
    pytest.param({"algorithm": "ppo", "roles": BASE_ROLES + [{"name": "reward"}]}, ["roles"], id="role-added"),
    pytest.param({"algorithm": "dpo", "roles": [{"name": "actor"}, {"name": "reference"}]},
                 ["algorithm", "roles"], id="both"),
])
def test_immutable_changes(new, paths):
    old = {"algorithm": "ppo", "roles": BASE_ROLES}
    changes = immutable_changes(old, new)
    assert [p for p, _ in changes] == paths
    assert all("immutable" in m for _, m in changes)


def test_immutable_change_message_shows_old_and_new_layout():
    [(_, message)] = immutable_changes({"algorithm": "sft", "roles": [{"name": "actor"}]},
                                       {"algorithm": "sft", "roles": [{"name": "actor"}, {"name": "critic"}]})
    assert "was actor, now actor, critic" in message


# --- trackers --------------------------------------------------------------------------------------


def test_trackers_are_off_by_default_and_read_with_their_secrets():
    assert not parse_spec(MINIMAL).trackers.wandb.enabled and not parse_spec(MINIMAL).trackers.mlflow.enabled
    spec = parse_spec({**MINIMAL, "trackers": {
        "wandb": {"enabled": True, "project": "rlhf", "apiKeySecret": {"name": "wandb-key", "key": "api-key"}},
        "mlflow": {"enabled": True, "experiment": "e"}}})
    assert spec.trackers.wandb.project == "rlhf" and spec.trackers.wandb.mode == "online"
    assert spec.trackers.wandb.api_key_secret == api.SecretKeyRef(name="wandb-key", key="api-key")
    assert spec.trackers.mlflow.experiment == "e" and spec.trackers.mlflow.token_secret is None


@pytest.mark.parametrize(("trackers", "path", "words"), [
    ({"wandb": {"mode": "cloud"}}, "trackers.wandb.mode", "online"),
    ({"wandb": {"apiKeySecret": {"name": "k"}}}, "trackers.wandb.apiKeySecret.key", "required"),
    ({"wandb": {"apiKeySecret": {"name": "K_bad", "key": "k"}}}, "trackers.wandb.apiKeySecret.name", "DNS-1123"),
    ({"mlflow": {"tokenSecret": {"name": "t", "key": "a/b"}}}, "trackers.mlflow.tokenSecret.key", "Secret key"),
    ({"mlflow": {"trackingURI": "x"}}, "trackers.mlflow.trackingURI", "unknown field"),
    ({"neptune": {}}, "trackers.neptune", "unknown field"),
])
def test_bad_tracker_fields_are_named(trackers, path, words):
    errors = errors_of({**MINIMAL, "trackers": trackers})
    assert [p for p, _ in errors] == [path], errors
    assert words in errors[0][1]


@given(gpus=st.lists(st.integers(0, 2), min_size=4, max_size=4),
       colocated=st.lists(st.sampled_from(["", "actor"]), min_size=3, max_size=3))
@settings(max_examples=60, deadline=None)
def test_roles_with_pods_all_have_gpus_or_none_has(gpus, colocated):
    """Over generated gpus / colocation of MINIMAL's four roles: exactly the roles with pods whose GPU-or-not
    differs from the first such role's are refused, each by its roles[i].gpus."""
    # one process per pod whatever the GPUs: the rank-count rules between roles stay out of the way
    roles = [{"name": "actor", "gpus": gpus[0], "processesPerPod": 1}]
    # a colocated role has no pods, and no gpus or processesPerPod of its own (test_colocated_roles_...)
    roles += [{"name": name, "colocateWith": c} if c else {"name": name, "gpus": g, "processesPerPod": 1}
              for name, g, c in zip(("critic", "reference", "reward"), gpus[1:], colocated, strict=True)]
    spec = {**MINIMAL, "roles": roles}
    # the actor always has pods (a role cannot colocate with itself): it is the first role with pods
    expected = {f"roles[{i}].gpus" for i, r in enumerate(roles)
                if i and "colocateWith" not in r and (r["gpus"] > 0) != (gpus[0] > 0)}
    if not expected:
        parse_spec(spec)
        return
    errors = errors_of(spec)
    assert {p for p, m in errors if "every role with pods needs GPUs" in m} == expected, errors
    assert all(p in expected for p, _ in errors), errors


@given(fields=st.fixed_dictionaries({}, optional={"replicas": st.integers(1, 3), "processesPerPod": st.integers(1, 3),
                                                 "gpus": st.integers(0, 2)}))
@settings(max_examples=40, deadline=None)
def test_colocated_roles_refuse_the_fields_that_set_ranks(fields):
    """A colocated role runs in its host's ranks: each of replicas, processesPerPod and gpus set on it to
    anything but the CRD's default (replicas 1, gpus 0, processesPerPod unset) is refused by its path;
    none of them was read before (a reference with replicas: 2 ran as one, in the actor's process)."""
    spec = cases.example("ppo-tiny")["spec"]
    spec["roles"][2] = {"name": "reference", "colocateWith": "actor", **fields}
    defaults = {"replicas": 1, "gpus": 0}
    expected = {f"roles[2].{key}" for key, value in fields.items() if value != defaults.get(key)}
    if not expected:
        assert parse_spec(spec).roles[2].colocate_with == "actor"
        return
    errors = errors_of(spec)
    assert {p for p, _ in errors} == expected, errors
    # processesPerPod > gpus may be refused on the same path as well (that rule does not look at colocateWith)
    refused = {p for p, m in errors if "must be unset on a colocated role" in m and "set it on the actor" in m}
    assert refused == expected, errors


@given(gpus=st.integers(0, 4), per_pod=st.one_of(st.none(), st.integers(1, 6)))
@settings(max_examples=40, deadline=None)
def test_processes_per_pod_is_at_most_the_pods_gpus(gpus, per_pod):
    """A pod's processes take one GPU each (their local rank's): more processes than gpus (> 0) is refused
    naming processesPerPod; unset means gpus (or 1)."""
    spec = cases.example("sft-tiny")["spec"]
    spec["hyperparameters"]["batchSize"] = 60  # divisible by every rank count here
    spec["roles"][0].update(gpus=gpus, **({"processesPerPod": per_pod} if per_pod else {}))
    if gpus and per_pod and per_pod > gpus:
        assert [p for p, _ in errors_of(spec)] == ["roles[0].processesPerPod"]
    else:
        assert parse_spec(spec).roles[0].processes_per_pod == (per_pod or max(gpus, 1))
