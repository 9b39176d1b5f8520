"""rlhf_contract.config: strict parsing of the trainer config JSON, errors naming the field."""

from __future__ import annotations

import json

import pytest
from rlhf_contract.algorithms import NAMES, required_roles
from rlhf_contract.config import load_config, parse_config
from rlhf_trainer.errors import ConfigError


def ppo_config(**overrides):
    cfg = {
        "job": "ppo-tiny",
        "namespace": "team-a",
        "algorithm": "ppo",
        "model": {"path": "tiny://llama"},
        "reward_model": None,
        "reward": {"type": "rule", "rule": "exact_match", "pattern": "", "callable": ""},
        "dataset": {"path": "synthetic://arithmetic", "format": "prompts", "eval_path": ""},
        "roles": {
            "actor": {"replicas": 2, "colocate_with": "", "deepspeed": {"zero_stage": 2, "bf16": False,
                                                                      "offload_optimizer": False,
                                                                      "gradient_checkpointing": False}},
            "critic": {"replicas": 1, "deepspeed": {"zero_stage": 3}},
            "reference": {"colocate_with": "actor"},
        },
        "hyperparameters": {"max_steps": 5, "clip_range": 0.3, "learning_rate": 1},
        "checkpoint": {"interval_steps": 2, "keep": 1},
    }
    cfg.update(overrides)
    return cfg


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return str(info.value)


def test_full_config_parses_with_types_and_defaults():
    cfg = parse_config(ppo_config())
    assert cfg.job == "ppo-tiny" and cfg.namespace == "team-a"
    assert cfg.roles["actor"].replicas == 2
    assert cfg.roles["critic"].deepspeed.zero_stage == 3
    assert cfg.roles["reference"].deepspeed.zero_stage == 2  # default filled in
    assert cfg.hyperparameters.clip_range == 0.3
    # an integer JSON value in a float field becomes a float
    assert isinstance(cfg.hyperparameters.learning_rate, float)
    assert cfg.hyperparameters.lam == 0.95
    assert cfg.colocated_into("actor") == ("reference",)
    assert cfg.checkpoint.keep == 1


def test_to_dict_round_trips():
    cfg = parse_config(ppo_config())
    assert parse_config(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("hyperparameters", "clip_range"), "0.2", "hyperparameters.clip_range: expected a number"),
        (("hyperparameters", "max_steps"), 2.5, "hyperparameters.max_steps: expected an integer"),
        (("hyperparameters", "max_steps"), True, "hyperparameters.max_steps: expected an integer"),
        (("hyperparameters", "whiten_advantages"), 1, "hyperparameters.whiten_advantages: expected a boolean"),
        (("hyperparameters", "clip_rnage"), 0.2, "hyperparameters.clip_rnage: unknown field (did you mean clip_range?)"),
        (("roles", "actor", "deepspeed", "zero_stage"), "2", "roles.actor.deepspeed.zero_stage: expected an integer"),
        (("roles", "actor", "gpus"), 1, "roles.actor.gpus: unknown field"),
        (("model",), "tiny://llama", "model: expected an object"),
        (("dataset", "path"), None, "dataset.path: expected a string"),
    ],
)
def test_wrong_type_or_unknown_field_names_the_path(path, value, message):
    data = ppo_config()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert message in error_of(data)


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"max_steps": 0}, "hyperparameters.max_steps: must be >= 1 (got 0)"),
        ({"learning_rate": 0.0}, "hyperparameters.learning_rate: must be > 0 (got 0.0)"),
        ({"dual_clip": 0.5}, "hyperparameters.dual_clip: must be 0 (off) or > 1 (got 0.5)"),
        ({"lam": 1.5}, "hyperparameters.lam: must be <= 1 (got 1.5)"),
        ({"kl_estimator": "k2"}, "hyperparameters.kl_estimator: must be one of: k1, k3"),
        ({"loss_type": "kto"}, "hyperparameters.loss_type: must be one of: sigmoid, ipo, hinge"),
        ({"label_smoothing": 0.5}, "hyperparameters.label_smoothing: must be < 0.5 (got 0.5)"),
        ({"group_size": 1}, "hyperparameters.group_size: must be >= 2 (got 1)"),
        ({"truncation_penalty": -0.5}, "hyperparameters.truncation_penalty: must be >= 0 (got -0.5)"),
        ({"non_finite": "ignore"}, "hyperparameters.non_finite: must be one of: fail, skip"),
    ],
)
def test_out_of_range_hyperparameter_names_the_field(hyperparameters, message):
    assert message in error_of(ppo_config(hyperparameters=hyperparameters))


def test_all_errors_are_reported_at_once():
    message = error_of(ppo_config(hyperparameters={"beta": "x", "seed": -1.0}, checkpoint={"keep": "3"}))
    assert "hyperparameters.beta" in message
    assert "hyperparameters.seed" in message
    assert "checkpoint.keep" in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithm": "a2c"}, f'algorithm: "a2c" is not one of {", ".join(NAMES)}'),
        ({"job": None}, "job: expected a string"),
        ({"dataset": {"path": "x.jsonl", "format": "csv"}}, "dataset.format"),
        ({"dataset": {"path": "x.jsonl", "template": "chatml"}},
         "dataset.template: must be one of: auto, chat, raw, or a Jinja chat template (got chatml)"),
        ({"dataset": {"path": "x.jsonl", "fields": {"question": "q"}}}, "dataset.fields.question: unknown field"),
        ({"dataset": {"path": "x.jsonl", "fields": {"prompt": 3}}}, "dataset.fields.prompt: expected a string"),
        ({"hyperparameters": {"max_truncated_share": 1.5}}, "hyperparameters.max_truncated_share: must be <= 1 (got 1.5)"),
        ({"hyperparameters": {"max_length": 1}}, "hyperparameters.max_length: must be >= 2 (got 1)"),
        ({"reward": {"type": "rule", "rule": "regex"}}, "reward.pattern: required when reward.rule is regex"),
        ({"reward": {"type": "rule", "rule": "callable", "callable": "pkg.mod"}}, 'reward.callable: expected "module:function"'),
        ({"reward": {"type": "model"}}, "reward_model.path: required when reward.type is model"),
        ({"roles": {"actor": {}, "critic": {}}}, "roles: must be exactly the roles actor, critic, reference for algorithm ppo with reward.type rule (missing: reference)"),
        ({"roles": {"actor": {}, "critic": {"colocate_with": "reward"}, "reference": {}}},
         'roles.critic.colocate_with: must name a role of this job (actor, critic, reference)'),
        ({"roles": {"actor": {"replicas": 0}, "critic": {}, "reference": {}}}, "roles.actor.replicas: must be >= 1 (got 0)"),
        ({"checkpoint": {"interval_steps": 0}}, "checkpoint.interval_steps: must be >= 1 (got 0)"),
        ({"roles": {"actor": {"lora": {"quantization": "8bit"}}, "critic": {}, "reference": {}}},
         "roles.actor.lora.quantization: 8bit needs lora.rank > 0"),
        ({"roles": {"actor": {"lora": {"rank": 8, "quantization": "4bit"}, "deepspeed": {"zero_stage": 3}},
                    "critic": {}, "reference": {}}},
         "roles.actor.lora.quantization: 4bit needs deepspeed.zeroStage <= 2 (got 3)"),
        ({"roles": {"actor": {"lora": {"rank": 8, "quantization": "4bit", "quant_type": "int4"}}, "critic": {},
                    "reference": {}}}, "roles.actor.lora.quant_type: must be one of: nf4, fp4 (got 'int4')"),
    ],
)
def test_cross_field_rules(overrides, message):
    assert message in error_of(ppo_config(**overrides))


def test_missing_required_fields_are_named():
    message = error_of({"job": "x"})
    for name in ("algorithm", "model", "dataset", "roles"):
        assert f"{name}: required" in message


def test_model_reward_needs_a_reward_role():
    data = ppo_config(reward={"type": "model"}, reward_model={"path": "/models/rm"})
    assert "must be exactly the roles actor, critic, reference, reward" in error_of(data)
    data["roles"]["reward"] = {"colocate_with": "critic"}
    assert parse_config(data).reward_model.path == "/models/rm"


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo", "dpo", "rm", "sft"])
def test_each_algorithm_parses_with_its_roles(algorithm):
    roles = {name: {} for name in required_roles(algorithm, "rule")}
    cfg = parse_config(ppo_config(algorithm=algorithm, roles=roles))
    assert set(cfg.roles) == set(roles)


def test_load_config_names_file_and_line_of_bad_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"job": "x",\n "algorithm": "ppo",\n "model": {path: 1}}\n')
    with pytest.raises(ConfigError, match=r"config\.json:3:\d+: invalid JSON"):
        load_config(path)


def test_load_config_prefixes_field_errors_with_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ppo_config(hyperparameters={"gamma": "1"})))
    with pytest.raises(ConfigError, match=r"config\.json: hyperparameters\.gamma: expected a number"):
        load_config(path)
    path.write_text(json.dumps(ppo_config()))
    assert load_config(path).job == "ppo-tiny"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="missing.json: cannot read"):
        load_config(tmp_path / "missing.json")
