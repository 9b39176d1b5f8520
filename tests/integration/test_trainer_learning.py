"""The real loops learn: rule reward up from chance (PPO), preference accuracy up (DPO), held-out
pairs ranked better than chance (RM). Tiny model, CPU, every role in the actor's process (the bridge
is covered by test_trainer_algorithms); seeded, so a run is repeatable on a given machine.

synthetic://arithmetic?max_operand=2: 9 prompts "a+b=" with 5 possible answers. A random init
almost never answers with a digit (mean exact_match reward ~0.01).
"""

import statistics

import pytest
import torch
from trainer_harness import launch, trainer_config

ARITHMETIC = {"path": "synthetic://arithmetic?max_operand=2", "format": "prompts"}
NO_CHECKPOINTS = {"interval_steps": 10_000, "keep": 1}


def _mean(rows, key):
    return statistics.mean(r[key] for r in rows)


PPO_ROLES = {"actor": {}, "critic": {"colocate_with": "actor"}, "reference": {"colocate_with": "actor"}}


@pytest.mark.slow
def test_ppo_raises_the_rule_reward(tmp_path):
    """The default truncation penalty (1.0): PPO learns to answer with a number and stop (EOS).

    Measured: ~0.01, then a dip while the policy first learns to stop at once (an empty answer
    scores 0, an unfinished one -1), then digit + EOS by ~step 110 and a plateau around 0.43: the
    most frequent sum for every prompt (last-10 means 0.425 / 0.435 / 0.434 for seeds 0, 1, 2).
    Digits come back only after that detour, from a low-entropy policy, and one of them takes every
    prompt. Not a PPO bug: with one new token PPO learns the sums like GRPO, and GRPO with two new
    tokens stalls at 0.42 too. Neither a larger critic learning rate, more PPO epochs, 256 prompts
    per step, lower learning rates, lam, an entropy bonus nor a KL penalty moved it (mostly seed 0,
    up to 800 steps); a penalty of 0.2 with 256 prompts per step does: crds/examples/ppo-tiny.yaml, whose
    default run (the README's first command, test_local_trainer.py) must learn the sums. Measured with that
    recipe (kl_coef 0, every role in one process; seed 0, mean reward per 10 steps): 0.03 0.09 0.14 0.18 0.25 0.42 0.54 0.62 0.71 0.78 0.81 0.82 ...;
    last-10 means for seeds 0..4: 0.82 / 0.89 / 0.73 / 0.87 / 0.72. With 64 or 128 prompts per step, 4
    of 5 runs end on the most frequent sum for every prompt (~0.43). GRPO's and RLOO's default runs
    learning the sums: test_examples_learn.py.
    """
    config = trainer_config(
        "ppo", roles=PPO_ROLES, dataset=ARITHMETIC, checkpoint=NO_CHECKPOINTS,
        hyperparameters={"max_steps": 130, "batch_size": 64, "micro_batch_size": 64, "max_new_tokens": 2,
                         "learning_rate": 2e-3, "kl_coef": 0.0},
    )
    run = launch(config, tmp_path)
    assert run.ok, run.describe()
    rows = run.metrics()
    assert _mean(rows[:5], "reward_mean") < 0.1
    assert _mean(rows[-10:], "reward_mean") > 0.35, [round(r["reward_mean"], 2) for r in rows[::10]]
    assert _mean(rows[-10:], "response_length") > 1.9  # a digit, then EOS
    assert all(r["value_loss"] is not None for r in rows)


@pytest.mark.slow
def test_dpo_raises_preference_accuracy(tmp_path):
    config = trainer_config(
        "dpo", roles={"actor": {}, "reference": {"colocate_with": "actor"}}, checkpoint=NO_CHECKPOINTS,
        hyperparameters={"max_steps": 30, "batch_size": 16, "micro_batch_size": 16, "learning_rate": 1e-3},
    )
    run = launch(config, tmp_path)
    assert run.ok, run.describe()
    rows = run.metrics()
    # Step 1's batch is scored by the initial policy (== reference): no preference yet.
    assert rows[0]["preference_accuracy"] < 0.5
    assert _mean(rows[-5:], "preference_accuracy") > 0.8, [round(r["preference_accuracy"], 2) for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(tmp_path):
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.common import encode_pairs
    from rlhf_trainer.chat import Renderer
    from rlhf_trainer.data import synthetic_preferences
    from rlhf_trainer.tokenized import tokenize_records
    from transformers import AutoModelForSequenceClassification

    config = trainer_config("rm", checkpoint=NO_CHECKPOINTS, hyperparameters={
        "max_steps": 40, "batch_size": 16, "micro_batch_size": 16, "learning_rate": 1e-3})
    run = launch(config, tmp_path)
    assert run.ok, run.describe()

    model = AutoModelForSequenceClassification.from_pretrained(run.checkpoint_dir / "export").eval()
    tokenizer = models.load_tokenizer(str(run.checkpoint_dir / "export"))
    held_out = synthetic_preferences(size=128, seed=12345)  # other pairs than training's seed 0
    rows, _ = tokenize_records(held_out, Renderer(tokenizer, "raw"), "pairs", max_prompt_length=16, max_length=32)
    batch = encode_pairs(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    accuracy = float((scores[:128] > scores[128:]).float().mean())
    assert accuracy > 0.7, accuracy


@pytest.mark.slow
def test_ppo_ptx_term_fits_the_pretraining_text(tmp_path):
    """PPO-ptx: with a pretraining dataset the actor's update also lowers the LM loss of that text
    (InstructGPT eq. 2); its loss is reported as ptx_loss, and only when a dataset is given."""
    texts = tmp_path / "pretrain.jsonl"
    texts.write_text("".join(f'{{"text": "apple river stone {w}"}}\n' for w in ("cloud", "green", "tiger")))
    config = trainer_config(
        "ppo", roles=PPO_ROLES, checkpoint=NO_CHECKPOINTS,
        dataset={**ARITHMETIC, "pretrain_path": str(texts)},
        hyperparameters={"max_steps": 12, "batch_size": 4, "micro_batch_size": 4, "max_new_tokens": 2,
                         "learning_rate": 2e-3, "ptx_coef": 1.0},
    )
    run = launch(config, tmp_path / "ptx")
    assert run.ok, run.describe()
    losses = [r["ptx_loss"] for r in run.metrics()]
    # Measured: 5.38, 4.87, 4.61, 4.43, 4.23, 4.06 ... 3.08 at step 12.
    assert losses[-1] < 0.7 * losses[0], [round(x, 2) for x in losses]


@pytest.mark.slow
def test_prm_learns_to_find_the_first_wrong_step(tmp_path):
    """A PRM on synthetic://partial_sum_steps (a+b+c=, one partial sum per line, half the rows with
    an error from a random line on): always answering "correct" gets 62.5% of the steps right and
    finds the first wrong step of 50% of the rows.

    Measured (training batches, means per 15 steps): step accuracy 0.64 until ~step 90, then 0.73
    0.81 0.87 0.89 ... 0.93; first-wrong-step accuracy 0.5 -> 0.88 (lr 2e-3: 0.88 / 0.81 at the end).
    """
    from rlhf_trainer import models
    from rlhf_trainer.algorithms.prm import step_batch
    from rlhf_trainer.chat import Renderer
    from rlhf_trainer.losses.prm import IGNORE, step_metrics, step_scores
    from rlhf_trainer.stepwise import synthetic_partial_sum_steps
    from rlhf_trainer.tokenized import tokenize_records

    config = trainer_config(
        "prm", checkpoint=NO_CHECKPOINTS, dataset={"path": "synthetic://partial_sum_steps", "format": "stepwise"},
        hyperparameters={"max_steps": 300, "batch_size": 64, "micro_batch_size": 64, "learning_rate": 5e-4},
    )
    run = launch(config, tmp_path)
    assert run.ok, run.describe()

    folder = str(run.checkpoint_dir / "export")
    model, tokenizer = models.load_token_classifier(folder, seed=0).eval(), models.load_tokenizer(folder)
    held_out = synthetic_partial_sum_steps(size=256, seed=12345)
    rows, _ = tokenize_records(held_out, Renderer(tokenizer, "raw"), "steps", max_prompt_length=16, max_length=32)
    batch = step_batch(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = step_scores(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    labelled = batch["targets"] != IGNORE
    counts = step_metrics([scores[i][labelled[i]].tolist() for i in range(len(held_out))],
                          [batch["targets"][i][labelled[i]].tolist() for i in range(len(held_out))])
    assert counts["steps_correct"] / counts["steps"] > 0.8, counts
    assert counts["first_wrong_correct"] / counts["examples"] > 0.7, counts
