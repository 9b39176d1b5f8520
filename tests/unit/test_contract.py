"""The operator <-> trainer contract (contract/rlhf_contract, docs/contract.md).

Both sides read the same definitions, so what is left to test: the operator's rendering of each
example and spec shape parses in the trainer (config JSON and env), the config round-trips through
its JSON, and the generated CRD, chart copy and docs/spec.md tables are what the contract makes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import rlhfjob_cases as cases
import yaml
from rlhf_contract import algorithms, generate, wire
from rlhf_contract.config import TrainerConfig, dump_config, parse_config
from rlhf_operator import api, builders
from rlhf_operator.builders import BuildSettings
from rlhf_trainer.distributed import read_process_env
from rlhf_trainer.runtime import check_process

REPO = Path(__file__).resolve().parents[2]
ALGORITHM_NAMES = algorithms.NAMES
EXAMPLES = cases.example_names()
SETTINGS = BuildSettings()


def load_example(name: str) -> api.Job:
    manifest = cases.example(name)
    manifest["metadata"].setdefault("namespace", "default")
    manifest["metadata"].setdefault("uid", "uid-example")
    return api.parse_job(manifest)


def rendered_config(job: api.Job) -> TrainerConfig:
    """The config exactly as a pod reads it: the ConfigMap's text, parsed by the trainer."""
    text = builders.build_config_map(job)["data"][wire.CONFIG_FILE]
    return parse_config(json.loads(text))


def pod_env(pod: dict) -> dict[str, str]:
    """A pod's env as its process sees it (the downward-API POD_IP filled in)."""
    env = {}
    for entry in pod["spec"]["containers"][0]["env"]:
        env[entry["name"]] = entry["value"] if "value" in entry else "10.1.2.3"
    return env


def assert_config_matches_spec(job: api.Job, cfg: TrainerConfig) -> None:
    spec = job.spec
    assert (cfg.job, cfg.namespace, cfg.algorithm) == (job.name, job.namespace, spec.algorithm)
    for got, source in ((cfg.model, spec.model), (cfg.reward_model, spec.reward_model)):
        # a fromJob source reaches the trainer as the folder its export is mounted at
        want = None if source is None else builders.source_model_path(source.from_job) if source.from_job \
            else source.path
        assert (got.path if got else None) == want
    assert dataclasses.asdict(cfg.reward) == dataclasses.asdict(spec.reward)
    assert dataclasses.asdict(cfg.dataset) == dataclasses.asdict(spec.dataset)
    assert dataclasses.asdict(cfg.hyperparameters) == dataclasses.asdict(spec.hyperparameters)
    assert (cfg.checkpoint.interval_steps, cfg.checkpoint.keep) == (spec.checkpoint.interval_steps, spec.checkpoint.keep)
    assert set(cfg.roles) == {r.name for r in spec.roles}
    for role in spec.roles:
        got = cfg.roles[role.name]
        assert (got.replicas, got.colocate_with) == (role.replicas, role.colocate_with)
        assert dataclasses.asdict(got.deepspeed) == dataclasses.asdict(role.deepspeed)


def test_there_is_an_example_for_every_algorithm():
    algorithms = {cases.example(name)["spec"]["algorithm"] for name in EXAMPLES}
    assert algorithms == set(ALGORITHM_NAMES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_parses_in_the_trainer(name):
    job = load_example(name)
    assert_config_matches_spec(job, rendered_config(job))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_pods_env_fits_the_rendered_config(name):
    """Every pod's env names a process the config has (the trainer's own startup check)."""
    job = load_example(name)
    cfg = rendered_config(job)
    for pod in builders.build_gang(job, 3, SETTINGS):
        env = read_process_env(pod_env(pod))
        check_process(env, cfg)
        assert env.config_path == wire.CONFIG_PATH
        assert env.checkpoint_dir == wire.CHECKPOINT_MOUNT
        assert env.restart_attempt == 3
        assert env.metrics_port == wire.TRAINER_METRICS_PORT
        assert env.pod_ip == "10.1.2.3"
        addrs = {role: f"{host}:{port}" for role, (host, port) in env.role_addrs.items()}
        assert addrs == builders.role_addrs(job, SETTINGS)
        assert env.bridge_addr == (f"{job.name}-actor-0.{job.name}.{job.namespace}.svc.cluster.local",
                                   wire.BRIDGE_PORT)


# Spec shapes the examples may not cover.
SPEC_VARIANTS = {
    "ppo with a reward model and every knob": {
        "algorithm": "ppo", "model": {"path": "/models/policy"}, "rewardModel": {"path": "/models/rm"},
        "reward": {"type": "model"}, "dataset": {"path": "/data/prompts.jsonl", "evalPath": "/data/eval.jsonl"},
        "roles": [{"name": "actor", "replicas": 2, "deepspeed": {"zeroStage": 3, "bf16": True}},
                  {"name": "critic", "deepspeed": {"offloadOptimizer": True, "gradientCheckpointing": True}},
                  {"name": "reward", "colocateWith": "critic"}, {"name": "reference", "colocateWith": "actor"}],
        "hyperparameters": {"maxSteps": 3, "dualClip": 3.0, "klTarget": 6.0, "klEstimator": "k3", "entropyCoef": 0.01,
                            "whitenAdvantages": False, "ppoEpochs": 2},
    },
    "grpo with a regex rule": {
        "algorithm": "grpo", "model": {"path": "tiny://qwen2"}, "reward": {"type": "rule", "rule": "regex",
                                                                          "pattern": "^4$"},
        "dataset": {"path": "synthetic://arithmetic"}, "roles": [{"name": "actor"}, {"name": "reference"}],
        "hyperparameters": {"groupSize": 8},
    },
    "rloo with a callable rule": {
        "algorithm": "rloo", "model": {"path": "tiny://llama"},
        "reward": {"type": "rule", "rule": "callable", "callable": "my_pkg.rewards:score"},
        "dataset": {"path": "synthetic://arithmetic"}, "roles": [{"name": "actor"}, {"name": "reference"}],
    },
    "dpo ipo loss with label smoothing": {
        "algorithm": "dpo", "model": {"path": "tiny://llama"}, "dataset": {"path": "/d.jsonl", "format": "pairs"},
        "roles": [{"name": "actor"}, {"name": "reference", "colocateWith": "actor"}],
        "hyperparameters": {"lossType": "ipo", "labelSmoothing": 0.1, "beta": 0.5},
    },
    "sft with packing": {
        "algorithm": "sft", "model": {"path": "tiny://llama"}, "dataset": {"path": "/d.jsonl", "format": "instruction"},
        "roles": [{"name": "actor", "replicas": 2}], "hyperparameters": {"packing": True},
    },
}


@pytest.mark.parametrize("name", SPEC_VARIANTS)
def test_spec_variant_renders_a_config_and_env_the_trainer_accepts(name):
    spec = {"image": "trainer:1", **SPEC_VARIANTS[name]}
    job = api.parse_job({"metadata": {"name": "v", "namespace": "ns", "uid": "u"}, "spec": spec})
    cfg = rendered_config(job)
    assert_config_matches_spec(job, cfg)
    for pod in builders.build_gang(job, 0, SETTINGS):
        check_process(read_process_env(pod_env(pod)), cfg)


def test_config_round_trips_through_its_json():
    for name in EXAMPLES:
        cfg = rendered_config(load_example(name))
        assert parse_config(json.loads(dump_config(cfg))) == cfg


# --- generated files: CI fails when a knob or algorithm changed without `python scripts/gen_contract.py`


@pytest.mark.parametrize("path", ["crds/rlhfjobs.yaml", "charts/rlhf-operator/crds/rlhfjobs.yaml"])
def test_crd_is_what_the_contract_generates(path):
    text = (REPO / path).read_text()
    assert generate.render_crd(text, path) == text, f"{path} is stale: run python scripts/gen_contract.py"


def test_spec_doc_tables_are_what_the_contract_generates():
    text = (REPO / "docs" / "spec.md").read_text()
    assert generate.render_doc(text) == text, "docs/spec.md is stale: run python scripts/gen_contract.py"


def test_generated_yaml_reads_back_as_the_schema():
    """The hand-rolled emitter writes what PyYAML reads back (floats with exponents, quoted words)."""
    for name, block in generate.CRD_BLOCKS.items():
        text = "\n".join(generate.yaml_lines(block(), 0))
        assert yaml.safe_load(text) == block(), name


def test_a_missing_marker_is_named():
    with pytest.raises(generate.MarkerError, match="no generated block"):
        generate.render_doc("no markers here", "x.md")


def test_the_contract_imports_only_the_standard_library():
    """Both images install rlhf_contract: it may import itself and the standard library, nothing else."""
    import ast
    import sys

    for path in sorted((REPO / "contract" / "rlhf_contract").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                top = name.split(".")[0]
                assert top == "rlhf_contract" or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_every_algorithm_row_is_complete_and_has_its_module():
    for a in algorithms.TABLE:
        assert a.roles[0] == "actor" and set(a.roles) <= set(algorithms.ROLE_NAMES), a.name
        assert a.data in algorithms.DATA_KINDS, a.name
        assert (REPO / "trainer_image" / "rlhf_trainer" / "algorithms" / f"{a.module}.py").exists(), a.name
