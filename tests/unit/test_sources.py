"""Model and dataset sources (issue 12 part 1): the URI grammar (rlhf_contract.sources), parse_spec's
errors naming the field, and the pod specs as table cases: the initializer only when a remote source is
named, Secrets as secretKeyRef env, read-only mounts, pvc subPath, the trainer config's rewritten paths."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest
from rlhf_contract.sources import (
    FETCH_MOUNT,
    INITIALIZER_CONTAINER,
    SourceRef,
    cache_dir_name,
    parse_source,
    s3_relative_key,
    source_uri,
)
from rlhf_operator import builders
from rlhf_operator.api import SpecError, parse_job
from rlhf_operator.builders import BuildSettings

SETTINGS = BuildSettings()
ROLES = [{"name": "actor", "replicas": 2}, {"name": "critic"}, {"name": "reference", "colocateWith": "actor"}]


def make_job(**spec):
    body = {"algorithm": "ppo", "image": "trainer:1", "model": {"path": "tiny://llama"},
            "reward": {"type": "rule", "rule": "exact_match"}, "dataset": {"path": "synthetic://arithmetic"},
            "roles": copy.deepcopy(ROLES)}
    body.update(spec)
    return parse_job({"metadata": {"name": "job", "namespace": "ns", "uid": "u", "generation": 1}, "spec": body})


# --- the grammar ------------------------------------------------------------------------------

PARSED = {
    "image folder": ("/models/llama", SourceRef("image", "/models/llama")),
    "tiny": ("tiny://llama", SourceRef("image", "tiny://llama")),
    "synthetic": ("synthetic://arithmetic?size=4", SourceRef("image", "synthetic://arithmetic?size=4")),
    "pvc claim": ("pvc://models", SourceRef("pvc", "models")),
    "pvc subPath": ("pvc://models/llama/7b", SourceRef("pvc", "models", inner="llama/7b")),
    "hf": ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", SourceRef("hf", "HuggingFaceTB/SmolLM2-135M-Instruct")),
    "hf revision": ("hf://org/name@v1.0", SourceRef("hf", "org/name", revision="v1.0")),
    "hf file": ("hf://org/data@main/train/part.jsonl", SourceRef("hf", "org/data", "main", "train/part.jsonl")),
    "s3": ("s3://bucket/models/llama", SourceRef("s3", "bucket/models/llama")),
}


@pytest.mark.parametrize("text,ref", PARSED.values(), ids=PARSED.keys())
def test_parse_source_and_back(text, ref):
    assert parse_source(text) == ref
    assert source_uri(ref) == text


BAD = {
    "unknown scheme": ("gs://b/x", "unknown scheme gs://"),
    "hf without name": ("hf://org", "names no ORG/NAME"),
    "hf bad revision": ("hf://org/name@", "not a revision"),
    "hf dotdot": ("hf://org/name/../x", "relative"),
    "s3 no prefix": ("s3://bucket", "prefix"),
    "s3 bad bucket": ("s3://B_ad/x", "not a bucket name"),
    "pvc bad claim": ("pvc://Models", "not a claim name"),
    "pvc dotdot": ("pvc://models/../etc", "relative"),
}


@pytest.mark.parametrize("text,message", BAD.values(), ids=BAD.keys())
def test_bad_uris_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_source(text)


def test_cache_folders_differ_by_revision_and_repo_type_not_by_file():
    a, b = parse_source("hf://org/x"), parse_source("hf://org/x@v2")
    assert cache_dir_name(a, "model") != cache_dir_name(b, "model")
    assert cache_dir_name(a, "model") != cache_dir_name(a, "dataset")
    assert cache_dir_name(parse_source("hf://org/x/a.jsonl"), "dataset") == cache_dir_name(a, "dataset")


def test_s3_keys_stay_inside_the_prefix():
    assert s3_relative_key("models/m/config.json", "models/m") == "m/config.json"
    assert s3_relative_key("models/m", "models/m") == "m"
    assert s3_relative_key("models/m2/config.json", "models/m") is None


# --- parse_spec -------------------------------------------------------------------------------

SPEC_ERRORS = {
    "model scheme": ({"model": {"path": "gs://b/m"}}, "spec.model.path", "must be a path in the image or a source"),
    "rewardModel hf": ({"rewardModel": {"path": "hf://only-org"}}, "spec.rewardModel.path", "ORG/NAME"),
    "pvc and path": ({"model": {"pvc": "models", "path": "/m"}}, "spec.model", "exactly one of path, pvc or fromJob"),
    "subPath alone": ({"model": {"path": "/m", "subPath": "x"}}, "spec.model.subPath", "only read with pvc"),
    "subPath escapes": ({"model": {"pvc": "models", "subPath": "../x"}}, "spec.model.subPath", "relative"),
    "revision on s3": ({"model": {"path": "s3://bucket/m", "revision": "v1"}}, "spec.model.revision", "hf://"),
    "dataset": ({"dataset": {"path": "s3://bucket"}}, "spec.dataset.path", "prefix"),
    "evalPath": ({"dataset": {"path": "/d.jsonl", "evalPath": "ftp://x/y"}}, "spec.dataset.evalPath", "hf:// or s3://"),
    "critic.model": ({"critic": {"model": "hf://x"}}, "spec.critic.model", "ORG/NAME"),
    "s3 endpoint": ({"sources": {"s3": {"endpoint": "minio:9000"}}}, "spec.sources.s3.endpoint", "http"),
    "secret name": ({"sources": {"s3": {"credentialsSecret": "S3"}}}, "spec.sources.s3.credentialsSecret", "DNS-1123"),
    "token key": ({"sources": {"hfTokenSecret": {"name": "hf"}}}, "spec.sources.hfTokenSecret.key", "required"),
}


@pytest.mark.parametrize("patch,field,message", SPEC_ERRORS.values(), ids=SPEC_ERRORS.keys())
def test_parse_spec_names_the_field(patch, field, message):
    with pytest.raises(SpecError) as err:
        make_job(**patch)
    assert any(f"{field}: " in part and message in part for part in str(err.value).split("; ")), str(err.value)


def test_model_pvc_and_revision_fold_into_the_path():
    assert make_job(model={"pvc": "models", "subPath": "/llama/7b/"}).spec.model.path == "pvc://models/llama/7b"
    assert make_job(model={"path": "hf://org/m", "revision": "abc"}).spec.model.path == "hf://org/m@abc"


# --- pods -------------------------------------------------------------------------------------

def _container(pod):
    return pod["spec"]["containers"][0]


def _init(pod):
    return {c["name"]: c for c in pod["spec"].get("initContainers", [])}.get(INITIALIZER_CONTAINER)


def _mounts(container):
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def _config(job):
    return json.loads(builders.build_config_map(job)["data"]["config.json"])


POD_CASES = {
    # name: (spec patch, initializer expected, pvc mounts expected {mountPath: subPath or None})
    "image paths only": ({}, False, {}),
    "pvc model": ({"model": {"pvc": "models", "subPath": "llama"}}, False, {"/sources/_pvc/models/llama": "llama"}),
    "pvc dataset, whole claim": ({"dataset": {"path": "pvc://data"}}, False, {"/sources/_pvc/data": None}),
    "hf model": ({"model": {"path": "hf://org/m"}}, True, {}),
    "s3 dataset": ({"dataset": {"path": "s3://bucket/d/train.jsonl"}}, True, {}),
    "hf critic": ({"critic": {"model": "hf://org/critic"}}, True, {}),
}


@pytest.mark.parametrize("patch,remote,pvc_mounts", POD_CASES.values(), ids=POD_CASES.keys())
def test_pod_table(patch, remote, pvc_mounts):
    job = make_job(**patch)
    pods = builders.build_gang(job, 0, SETTINGS)
    for pod in pods:
        kubernetes_validate.validate(pod, "1.36", strict=True)
        mounts = _mounts(_container(pod))
        assert (_init(pod) is not None) == remote
        assert (FETCH_MOUNT in mounts) == remote
        if remote:
            assert mounts[FETCH_MOUNT]["readOnly"] is True
            assert mounts[FETCH_MOUNT]["name"] == "checkpoints" and mounts[FETCH_MOUNT]["subPath"] == "sources"
            init_mounts = _mounts(_init(pod))
            assert FETCH_MOUNT not in init_mounts  # it writes through the volume's own mount
            assert init_mounts["/checkpoints"]["name"] == "checkpoints" and "subPath" not in init_mounts["/checkpoints"]
            assert _init(pod)["command"][_init(pod)["command"].index("--cache") + 1] == "/checkpoints/sources"
        for path, sub in pvc_mounts.items():
            assert mounts[path]["readOnly"] is True and mounts[path].get("subPath") == sub
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mounts[path]["name"])
            assert volume["persistentVolumeClaim"]["readOnly"] is True
        assert not [p for p in mounts if p.startswith("/sources/_pvc")] or pvc_mounts


def test_first_pod_fetches_the_others_wait():
    job = make_job(model={"path": "hf://org/m@v1"}, dataset={"path": "hf://org/d/train.jsonl",
                                                             "evalPath": "hf://org/d/eval.jsonl"})
    pods = builders.build_gang(job, 0, SETTINGS)
    commands = {p["metadata"]["name"]: _init(p)["command"] for p in pods}
    first = commands.pop(builders.gang_pod_names(job)[0])
    assert "--wait" not in first
    assert all("--wait" in c for c in commands.values()) and commands
    # one fetch per repository: the two files of org/d are one item
    assert [a for a in first if "=" in a] == ["model=hf://org/m@v1", "dataset=hf://org/d"]


def test_trainer_config_paths_point_into_the_mounts():
    job = make_job(model={"path": "hf://org/m"}, critic={"model": "s3://bucket/critics/c"},
                   dataset={"path": "pvc://data/sets/train.jsonl", "evalPath": "hf://org/d/eval.jsonl"})
    config = _config(job)
    assert config["model"]["path"] == f"{FETCH_MOUNT}/{cache_dir_name(parse_source('hf://org/m'), 'model')}"
    assert config["critic"]["model"].endswith("/c") and config["critic"]["model"].startswith(FETCH_MOUNT)
    assert config["dataset"]["path"] == "/sources/_pvc/data/sets/train.jsonl"
    assert config["dataset"]["eval_path"].endswith("/eval.jsonl")


def test_secrets_reach_only_the_initializer_as_secret_key_refs():
    job = make_job(model={"path": "hf://org/m"}, dataset={"path": "s3://bucket/d/train.jsonl"},
                   sources={"hfTokenSecret": {"name": "hf", "key": "token"},
                            "s3": {"endpoint": "http://minio.minio:9000", "region": "eu-1",
                                   "credentialsSecret": "s3-keys"}})
    pod = builders.build_gang(job, 0, SETTINGS)[0]
    env = {e["name"]: e for e in _init(pod)["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"] == {"secretKeyRef": {"name": "s3-keys", "key": name}}
    # STS credentials: the token too, optional (a Secret of long-lived keys has none)
    assert env["AWS_SESSION_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-keys", "key": "AWS_SESSION_TOKEN", "optional": True}}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-1"
    trainer_env = {e["name"] for e in _container(pod)["env"]}
    assert not trainer_env & {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert "s3-keys" not in json.dumps(_config(job))


def test_run_local_refuses_pvc_sources_naming_the_field():
    from rlhf_operator import local

    jobs = [make_job(model={"path": "hf://org/m"}, dataset={"path": "pvc://data/train.jsonl"}), make_job()]
    problems = local.unsupported_sources(jobs)
    assert len(problems) == 1
    assert problems[0].startswith("job: spec.dataset.path: pvc:// sources need a cluster")


def test_a_pod_template_adds_env_to_the_initializer_by_name():
    template = {"spec": {"initContainers": [{"name": INITIALIZER_CONTAINER,
                                             "env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]}]}}
    job = make_job(model={"path": "hf://org/m"}, podTemplate=template)
    pod = builders.build_gang(job, 0, SETTINGS)[0]
    assert len(pod["spec"]["initContainers"]) == 1
    env = {e["name"]: e.get("value") for e in _init(pod)["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy:3128" and "HF_HOME" in env
    assert _init(pod)["command"][:3] == ["python", "-m", "rlhf_trainer.initializer"]


def test_an_unknown_scheme_is_reported_once_per_field():
    with pytest.raises(SpecError) as err:
        make_job(model={"path": "gs://b/m"}, critic={"model": "gs://b/c"})
    assert sorted(path for path, _ in err.value.errors) == ["critic.model", "model.path"]
