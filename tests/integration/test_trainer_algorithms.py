"""Each algorithm runs a few steps with its roles as separate processes over the bridge (or colocated):
finite losses, parameters changed, every step checkpointed COMPLETE, a loadable export.
"""

import math

import pytest
import torch
from rlhf_trainer import checkpoint
from trainer_harness import launch, trainer_config

# name -> (algorithm, roles, extra config); layouts chosen to cover separate, colocated and replicated roles.
CASES = {
    "ppo: critic, reference in their own processes, padding-free": (
        "ppo", None, {"hyperparameters": {"padding_free": True}}),
    "ppo: reward model colocated with the critic, old log-probs from sampling": (
        "ppo",
        {"actor": {}, "critic": {}, "reward": {"colocate_with": "critic"}, "reference": {"colocate_with": "actor"}},
        {"reward_model": "tiny://llama", "hyperparameters": {"old_log_probs": "sampling"}},
    ),
    "grpo: reference colocated in the actor, prefix sharing": (
        "grpo", {"actor": {}, "reference": {"colocate_with": "actor"}}, {"hyperparameters": {"prefix_sharing": True}}),
    # A model reward: distinct scores within a group, so the advantages (and the update) are not zero.
    "rloo: two actor ranks (ZeRO-2) served by one reference + reward process, padding-free": (
        "rloo", {"actor": {"replicas": 2}, "reference": {}, "reward": {"colocate_with": "reference"}},
        {"reward_model": "tiny://llama", "hyperparameters": {"padding_free": True}}),
    "grpo: dr_grpo aggregation and clip-higher, two epochs": (
        "grpo", {"actor": {}, "reference": {"colocate_with": "actor"}},
        {"hyperparameters": {"loss_aggregation": "dr_grpo", "clip_range_high": 0.28, "ppo_epochs": 2}}),
    "reinforce_pp: reference in its own process, per-response loss mean": (
        "reinforce_pp", None, {"hyperparameters": {"loss_aggregation": "grpo"}}),
    "dpo: reference in its own process": ("dpo", None, {}),
    "dpo: ipo on token-averaged log-probs, prefix sharing in micro-batches of 2": (
        "dpo", None, {"hyperparameters": {"loss_type": "ipo", "prefix_sharing": True, "micro_batch_size": 2}}),
    "simpo: no reference role": ("simpo", None, {}),
    "orpo: no reference role": ("orpo", None, {}),
    "cpo: no reference role": ("cpo", None, {}),
    "rm: Bradley-Terry reward model": ("rm", None, {}),
    "sft: packed examples, ZeRO-3": (
        "sft", {"actor": {"deepspeed": {"zero_stage": 3}}}, {"hyperparameters": {"packing": True}}),
}


def _initial_weights(algorithm):
    from rlhf_trainer import models

    if algorithm == "rm":
        return models.load_reward_model("tiny://llama", seed=0).state_dict()
    return models.load_policy("tiny://llama", seed=0).state_dict()


def _load_export(algorithm, folder):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    AutoTokenizer.from_pretrained(folder)
    cls = AutoModelForSequenceClassification if algorithm == "rm" else AutoModelForCausalLM
    return cls.from_pretrained(folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_algorithm_runs_checkpoints_and_exports(name, tmp_path):
    algorithm, roles, extra = CASES[name]
    extra = dict(extra)
    hyperparameters = extra.pop("hyperparameters", {})
    config = trainer_config(algorithm, roles=roles, hyperparameters=hyperparameters, **extra)
    run = launch(config, tmp_path)
    assert run.ok, run.describe()

    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["loss"] is not None and math.isfinite(row["loss"]), row
        assert row["tokens_per_second"] > 0
        assert row["train_peak_memory_bytes"] > 0  # peak RSS of the update phase (device memory on GPU)
    if algorithm in ("ppo", "grpo", "rloo", "reinforce_pp"):
        assert all(r["response_length"] > 0 for r in rows)
        if config["reward"]["type"] == "rule":  # exact_match scores 0, 0.1 or 1
            assert all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    if algorithm == "ppo":
        assert all(math.isfinite(r["value_loss"]) for r in rows)

    root = run.checkpoint_dir
    assert checkpoint.list_steps(root) == [1, 2]
    assert all(checkpoint.is_complete(root, s) for s in (1, 2))
    assert checkpoint.select_resume_step(root, sorted(config["roles"])) == 2
    for role in config["roles"]:
        assert (checkpoint.step_dir(root, 2) / role / checkpoint.MANIFEST).is_file()

    exported = _load_export(algorithm, root / "export").state_dict()
    initial = _initial_weights(algorithm)
    changed = [k for k in initial if not torch.equal(initial[k], exported[k])]
    assert changed, "no parameter changed during training"


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["padding_free", "prefix_sharing", "prefix_sharing+gradient_checkpointing"])
def test_dpo_speed_switches_give_the_plain_runs_losses(tmp_path, switch):
    """hyperparameters.paddingFree and prefixSharing change how the tokens are laid out, not what is learned:
    the same seed gives the same per-step losses and accuracies, the actor's and the reference's forwards
    (the reference in its own process, over the bridge) both switched. Prefix sharing needs no key/value
    cache, so the actor's gradientCheckpointing beside it changes nothing either."""
    knob, _, checkpointing = switch.partition("+")
    runs = {}
    for on in (False, True):
        actor = {"deepspeed": {"gradient_checkpointing": True}} if on and checkpointing else {}
        config = trainer_config("dpo", hyperparameters={knob: on, "micro_batch_size": 2},
                                roles={"actor": actor, "reference": {}})
        run = launch(config, tmp_path / f"{switch}-{on}")
        assert run.ok, run.describe()
        runs[on] = run.metrics()
    for plain, switched in zip(runs[False], runs[True], strict=True):
        assert switched["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-5), (plain, switched)
        # Not the accuracy: at step 1 the policy is the reference, every margin is 0 up to float rounding,
        # and which side of 0 the rounding falls on differs between the two layouts.
        assert switched["reward_mean"] == pytest.approx(plain["reward_mean"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_a_critic_of_its_own_training_beside_the_policy_gives_the_colocated_runs_losses(tmp_path):
    """A critic in its own process trains its epoch while the actor trains the policy's (RemoteClient.submit);
    a colocated one after it. Two PPO epochs, the same seed: the same rewards, KL and losses per step."""
    runs = {}
    for layout, critic in (("colocated", {"colocate_with": "actor"}), ("own-process", {"replicas": 1})):
        roles = {"actor": {"replicas": 1}, "critic": critic, "reference": {"colocate_with": "actor"}}
        config = trainer_config("ppo", roles=roles, hyperparameters={"ppo_epochs": 2, "max_steps": 3})
        run = launch(config, tmp_path / layout)
        assert run.ok, run.describe()
        runs[layout] = [row for row in run.metrics() if "value_loss" in row]
    assert len(runs["colocated"]) == 3
    for colocated, own in zip(runs["colocated"], runs["own-process"], strict=True):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss"):
            assert own[key] == pytest.approx(colocated[key], rel=1e-4, abs=1e-6), (key, colocated, own)
    assert all("critic_train_peak_memory_bytes" in row for row in runs["own-process"])


@pytest.mark.slow
def test_ppo_padding_free_gives_the_plain_runs_values_and_losses(tmp_path):
    """hyperparameters.paddingFree packs PPO's critic (values and its update) and reward model (scores) too:
    with the reward model, critic and reference each in its own process, the same seed gives the same
    rewards, KL and policy and value losses per step."""
    runs = {}
    for on in (False, True):
        config = trainer_config("ppo", reward_model="tiny://llama", hyperparameters={"padding_free": on})
        run = launch(config, tmp_path / f"padding-free-{on}")
        assert run.ok, run.describe()
        runs[on] = run.metrics()
    for plain, packed in zip(runs[False], runs[True], strict=True):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss"):
            assert packed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), (key, plain, packed)
    # each serving process's peak memory per op, in the actor's step log (RSS on CPU: well above 10 MB)
    served = ("reference_logprobs", "reward_score", "critic_values", "critic_train")
    for row in runs[True]:
        assert all(row[f"{op}_peak_memory_bytes"] > 10e6 for op in served), row
