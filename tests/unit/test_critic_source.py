"""rlhf_trainer.runtime.critic_source: where the PPO critic starts (critic.model)."""

from __future__ import annotations

import pytest
from rlhf_contract.config import ConfigError, CriticConfig, ModelConfig, RewardConfig, TrainerConfig
from rlhf_trainer import models
from rlhf_trainer.runtime import critic_source, same_vocabulary


def config(critic: str, reward_model: str | None):
    reward = RewardConfig(type="model") if reward_model else RewardConfig(type="rule", rule="exact_match")
    return TrainerConfig(job="j", algorithm="ppo", model=ModelConfig("/models/policy"), dataset=None, roles={},
                         reward_model=ModelConfig(reward_model) if reward_model else None, reward=reward,
                         critic=CriticConfig(critic))


@pytest.mark.parametrize(("critic", "reward_model", "expected"), [
    pytest.param("auto", "/models/rm", ("/models/rm", "reward"), id="auto-with-a-reward-model"),
    pytest.param("auto", None, ("/models/policy", "policy"), id="auto-with-a-rule"),
    pytest.param("policy", "/models/rm", ("/models/policy", "policy"), id="policy"),
    pytest.param("reward", "/models/rm", ("/models/rm", "reward"), id="reward"),
    pytest.param("/models/critic-rm", None, ("/models/critic-rm", "reward"), id="a-classifier-folder"),
    pytest.param("/models/sft", None, ("/models/sft", "policy"), id="a-causal-lm-folder"),
])
def test_critic_source(critic, reward_model, expected):
    assert critic_source(config(critic, reward_model), lambda path: path.endswith("-rm")) == expected


def test_reward_without_a_reward_model_is_a_config_error():
    with pytest.raises(ConfigError, match="critic.model: reward needs a reward model"):
        critic_source(config("reward", None), lambda path: False)


def test_same_vocabulary():
    tiny = models.load_tokenizer("tiny://llama")
    assert same_vocabulary(tiny, models.load_tokenizer("tiny://qwen2"))

    class Other:
        def get_vocab(self):
            return {"a": 0}

    assert not same_vocabulary(tiny, Other())
