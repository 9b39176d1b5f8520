"""Checkpoint layout, manifests, fallback from a corrupt newest step, pruning, exact resume."""

import json

import pytest
import torch
from rlhf_contract.config import DeepSpeedConfig
from rlhf_trainer import checkpoint as ckpt
from rlhf_trainer.strategy import DeepSpeedStrategy
from trainer_world import role_world, tiny_causal_lm  # noqa: F401 (fixtures)

PRUNE_CASES = {
    "keeps the newest complete ones": ([2, 4, 6, 8], [2, 4, 6, 8], 2, [2, 4]),
    "an incomplete newest step is kept (it may be in progress)": ([2, 4, 6], [2, 4], 1, [2]),
    "incomplete older leftovers go": ([2, 3, 4], [4], 1, [2, 3]),
    "nothing complete, nothing deleted": ([2, 4], [], 3, []),
    "fewer than keep": ([2], [2], 3, []),
}


@pytest.mark.parametrize("name", PRUNE_CASES)
def test_steps_to_prune(name):
    steps, complete, keep, expected = PRUNE_CASES[name]
    assert ckpt.steps_to_prune(steps, complete, keep) == expected


def _fake_role_dir(root, step, role, payload=b"weights"):
    directory = ckpt.step_dir(root, step) / role
    directory.mkdir(parents=True)
    (directory / "w.bin").write_bytes(payload)
    ckpt.write_json_atomic(directory / ckpt.MANIFEST, ckpt.file_manifest(directory))


def test_resume_picks_newest_complete_and_verified(tmp_path):
    for step in (2, 4, 6):
        for role in ("actor", "critic"):
            _fake_role_dir(tmp_path, step, role)
    ckpt.mark_complete(tmp_path, 2, ["actor", "critic"])
    ckpt.mark_complete(tmp_path, 4, ["actor", "critic"])
    # step 6 has files but no COMPLETE: some role never finished saving it.
    assert ckpt.select_resume_step(tmp_path, ["actor", "critic"]) == 4


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "w.bin").write_bytes(b"weig"),  # truncated
        lambda d: (d / "w.bin").write_bytes(b"WEIGHTS"),  # same size, other bytes
        lambda d: (d / "w.bin").unlink(),
        lambda d: (d / ckpt.MANIFEST).write_text("{not json"),
    ],
    ids=["truncated", "flipped", "missing", "bad-manifest"],
)
def test_corrupt_newest_falls_back(tmp_path, damage):
    for step in (2, 4):
        _fake_role_dir(tmp_path, step, "actor")
        ckpt.mark_complete(tmp_path, step, ["actor"])
    damage(ckpt.step_dir(tmp_path, 4) / "actor")
    logged = []
    assert ckpt.select_resume_step(tmp_path, ["actor"], log=logged.append) == 2
    assert "step-4" in logged[0]


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert ckpt.select_resume_step(tmp_path / "absent", ["actor"]) is None


def test_complete_marker_is_json(tmp_path):
    _fake_role_dir(tmp_path, 3, "actor")
    ckpt.mark_complete(tmp_path, 3, ["actor"])
    assert json.loads((ckpt.step_dir(tmp_path, 3) / ckpt.COMPLETE).read_text())["step"] == 3
    ckpt.unmark_complete(tmp_path, 3)
    assert not ckpt.is_complete(tmp_path, 3)


def _train_steps(strategy, batches):
    for ids in batches:
        loss = strategy.forward(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        strategy.step()


def _new_strategy(model):
    return DeepSpeedStrategy(model, DeepSpeedConfig(zero_stage=2), learning_rate=1e-2, micro_batch_size=2, grad_accum=1)


def test_save_then_resume_restores_weights_optimizer_and_rng(tmp_path, role_world, tiny_causal_lm):  # noqa: F811
    from transformers import LlamaForCausalLM

    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 100, (2, 10), generator=gen) for _ in range(4)]
    first = _new_strategy(tiny_causal_lm)
    _train_steps(first, batches[:2])
    saver = ckpt.RoleCheckpointer(tmp_path, "actor", first)
    saver.save(2, {"data_position": {"epoch": 0, "index": 16}})
    ckpt.mark_complete(tmp_path, 2, ["actor"])
    assert not list(ckpt.step_dir(tmp_path, 2).glob(".tmp-*"))
    expected_noise = torch.rand(3)  # RNG right after saving

    torch.manual_seed(123)
    second = _new_strategy(LlamaForCausalLM(tiny_causal_lm.config))
    assert ckpt.select_resume_step(tmp_path, ["actor"]) == 2
    state = ckpt.RoleCheckpointer(tmp_path, "actor", second).load(2)
    assert state["step"] == 2 and state["data_position"] == {"epoch": 0, "index": 16}
    assert torch.equal(torch.rand(3), expected_noise)
    for name, tensor in first.module.state_dict().items():
        assert torch.equal(tensor, second.module.state_dict()[name]), name
    a, b = first.optimizer_state_tensors(), second.optimizer_state_tensors()
    assert a.keys() == b.keys() and any(".exp_avg" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # Both continue identically.
    _train_steps(first, batches[2:])
    _train_steps(second, batches[2:])
    for name, tensor in first.module.state_dict().items():
        assert torch.allclose(tensor, second.module.state_dict()[name], atol=0, rtol=0), name


def test_an_edited_learning_rate_takes_effect_after_the_resume(tmp_path, role_world, tiny_causal_lm):  # noqa: F811
    """A rolled-out edit of hyperparameters.learningRate: the optimizer state comes back from the checkpoint,
    the learning rate from the config (issue 18, part 3: no field silently ignored)."""
    from rlhf_contract.config import DeepSpeedConfig as Settings
    from transformers import LlamaForCausalLM

    first = _new_strategy(tiny_causal_lm)
    _train_steps(first, [torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(2))])
    ckpt.RoleCheckpointer(tmp_path, "actor", first).save(1, {})
    edited = DeepSpeedStrategy(LlamaForCausalLM(tiny_causal_lm.config), Settings(zero_stage=2), learning_rate=5e-4,
                               micro_batch_size=2, grad_accum=1)
    ckpt.RoleCheckpointer(tmp_path, "actor", edited).load(1)
    assert {g["lr"] for g in edited.optimizer.param_groups} == {5e-4}
    assert any(".exp_avg" in k for k in edited.optimizer_state_tensors())


def test_saved_world_size_counts_the_ranks_that_saved_a_role(tmp_path):
    from rlhf_trainer.checkpoint import saved_world_size

    assert saved_world_size(tmp_path / "missing") == 0
    for name in ("state-rank0.pt", "state-rank1.pt", "state-rank10.pt", "MANIFEST.json", "state-rank.pt"):
        (tmp_path / name).write_text("")
    assert saved_world_size(tmp_path) == 3


@pytest.mark.parametrize("saved", [None, 0, 1, 2, 3])
@pytest.mark.parametrize("stage", [None, 0, 1, 2, 3])
def test_zero_stage_changes_the_universal_checkpoint_can_make(saved, stage):
    """Same stage (a world-size change) and 1 <-> 2 load through the universal checkpoint; every other change
    is refused naming both stages (measured on CPU with DeepSpeed 0.19: 2 -> 3, 3 -> 2, 0 -> 2 and 2 -> 0 fail,
    1 -> 2 resumes)."""
    problem = ckpt.stage_change_problem(saved, stage)
    if None in (saved, stage) or saved == stage or {saved, stage} <= {1, 2}:
        assert problem is None
    else:
        assert f"not from stage {saved} to {stage}" in problem
