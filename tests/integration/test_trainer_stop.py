"""SIGTERM is a request to stop, not a crash (issue 18, part 5): the gang finishes its step, saves a last
checkpoint when it fits in RLHF_TERMINATION_GRACE_SECONDS, and exits 143; a restarted gang resumes there.

Three processes (actor, critic, reference) of a tiny PPO job that would run 200 steps with no periodic
checkpoint. Only the critic is signalled, as when only its pod is evicted: the actor learns of it from the
marker file on the shared checkpoint volume.
"""

import signal

import pytest
from rlhf_contract import wire
from rlhf_trainer import checkpoint
from trainer_harness import launch, trainer_config


def signal_once(name: str, after_step: int):
    """A while_running hook: SIGTERM to process `name` once the actor logged `after_step`."""
    sent = []

    def hook(run, processes):
        rows = run.metrics()
        if not sent and rows and rows[-1]["step"] >= after_step and name in processes:
            processes[name].send_signal(signal.SIGTERM)
            sent.append(rows[-1]["step"])

    hook.sent = sent
    return hook


@pytest.mark.slow
def test_a_signalled_critic_stops_the_gang_after_a_last_checkpoint_and_the_next_gang_resumes_there(tmp_path):
    config = trainer_config("ppo", hyperparameters={"max_steps": 200}, checkpoint={"interval_steps": 1000, "keep": 2})
    hook = signal_once("critic-0", after_step=2)
    first = launch(config, tmp_path / "attempt0", while_running=hook, kill_on_failure=False, timeout=240,
                   extra_env={wire.ENV_TERMINATION_GRACE: "60"})
    assert hook.sent, first.describe()
    assert first.returncodes == {"actor-0": wire.EXIT_STOPPED, "critic-0": wire.EXIT_STOPPED, "reference-0": 0}, \
        first.describe()
    last = first.metrics()[-1]["step"]
    assert last < 200
    assert "saving it first" in first.logs["actor-0"]
    assert checkpoint.select_resume_step(first.checkpoint_dir, sorted(config["roles"])) == last

    config["hyperparameters"]["max_steps"] = last + 1
    second = launch(config, tmp_path / "attempt1", checkpoint_dir=first.checkpoint_dir, restart_attempt=1)
    assert second.ok, second.describe()
    for name in ("actor-0", "critic-0", "reference-0"):
        assert f"resumed from step {last}" in second.logs[name], second.logs[name][-2000:]
    assert [r["step"] for r in second.metrics()][-1] == last + 1


@pytest.mark.slow
def test_no_time_left_in_the_grace_period_stops_without_saving(tmp_path):
    config = trainer_config("sft", hyperparameters={"max_steps": 200}, checkpoint={"interval_steps": 1000, "keep": 2})
    hook = signal_once("actor-0", after_step=2)
    run = launch(config, tmp_path, while_running=hook, kill_on_failure=False, timeout=240,
                 extra_env={wire.ENV_TERMINATION_GRACE: "0"})
    assert hook.sent, run.describe()
    assert run.returncodes == {"actor-0": wire.EXIT_STOPPED}, run.describe()
    assert "no time left to save it" in run.logs["actor-0"]
    assert checkpoint.select_resume_step(run.checkpoint_dir, ["actor"]) is None
