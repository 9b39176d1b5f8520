"""The local runner with the real builders and planner, and a fake trainer (tests/integration/
local_fake_trainer.py) so the restart logic is exercised in seconds: completion, gang restarts after
random kills with bounded redone work, permanent errors, suspend/resume, SIGTERM without orphans."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rlhf_operator import local, localexec, localfaults, planner, report

REPO = Path(__file__).resolve().parents[2]
FAKE = [sys.executable, str(Path(__file__).with_name("local_fake_trainer.py"))]


def manifest(name="fake-ppo", max_steps=8, interval=2, max_restarts=3, **spec):
    obj = yaml.safe_load((REPO / "crds" / "examples" / "ppo-tiny.yaml").read_text())
    obj["metadata"]["name"] = name
    obj["spec"]["hyperparameters"]["maxSteps"] = max_steps
    obj["spec"]["checkpoint"]["intervalSteps"] = interval
    obj["spec"]["failurePolicy"] = {"maxRestarts": max_restarts, "backoffSeconds": 1}
    obj["spec"].update(spec)
    return obj


def runner(tmp_path, obj, env=None, **kw):
    env = {"FAKE_STEP_SECONDS": "0.05", **(env or {})}
    return local.LocalRunner(obj, tmp_path, trainer_command=FAKE, extra_env=env, serve_metrics=False,
                             stop_grace=2, **kw)


def test_job_runs_to_succeeded_with_complete_checkpoints_and_status(tmp_path):
    r = runner(tmp_path, manifest(max_steps=6))
    status = r.run(timeout=60)
    assert status["phase"] == "Succeeded" and status.get("restarts", 0) == 0
    ck = tmp_path / "fake-ppo" / "checkpoints"
    assert sorted(p.parent.name for p in ck.glob("step-*/COMPLETE")) == ["step-2", "step-4", "step-6"]
    assert (ck / "export" / "config.json").exists()
    assert {p.stem for p in (ck / "metrics").glob("*.jsonl")} == {"actor-0", "critic-0", "reference-0"}
    assert json.loads((tmp_path / "fake-ppo" / "status.json").read_text())["phase"] == "Succeeded"
    config = json.loads((tmp_path / "fake-ppo" / "config" / "config.json").read_text())
    assert config["hyperparameters"]["max_steps"] == 6
    assert r.supervisor.processes() == {}
    # one process per role, started once
    assert len(r.timeline.times("pod_started")) == 3


def test_random_kills_restart_the_gang_and_lose_at_most_one_interval(tmp_path):
    for trial in range(2):
        r = runner(tmp_path / str(trial), manifest(max_steps=30, interval=3, max_restarts=3))
        result = localfaults.run_with_kills(r, kills=2, rng=random.Random(trial), max_delay=0.3, timeout=120)
        assert result.error == "", result.error
        assert len(result.kills) == 2
        assert result.ok(), result
        assert len(result.gang_restart_s) == 2 and all(s > 0 for s in result.gang_restart_s)
        assert r.supervisor.processes() == {}


def test_permanent_error_fails_once_without_restart_and_names_file_and_line(tmp_path):
    msg = "prompts.jsonl:3: missing field 'prompt'"
    r = runner(tmp_path, manifest(), env={"FAKE_EXIT_CODE": "65", "FAKE_EXIT_MESSAGE": msg})
    status = r.run(timeout=60)
    assert status["phase"] == "Failed" and status.get("restarts", 0) == 0
    failed = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["reason"] == "PermanentError" and "prompts.jsonl:3" in failed[0]["message"]
    assert len(r.timeline.times("pod_started")) == 3  # no second gang


def test_permanent_exit_after_the_restart_was_decided_fails_the_job(tmp_path, monkeypatch):
    """The critic exits 1 at once; the actor runs on and, told to stop by the gang restart, exits 78 in its
    grace period: the restart is cancelled and the job fails with the actor's message (issue 18, part 6)."""
    monkeypatch.setattr(planner, "FAILURE_SETTLE_SECONDS", 1.0)
    r = runner(tmp_path, manifest(max_steps=100, interval=100),
               env={"FAKE_STEP_SECONDS": "0.5", "FAKE_EXIT_CODE": "1", "FAKE_EXIT_ROLE": "critic",
                    "FAKE_TERM_EXIT_CODE": "78", "FAKE_EXIT_MESSAGE": "reward.callable: no module named x"})
    status = r.run(timeout=60)
    failed = [c for c in status["conditions"] if c["type"] == "Failed"]
    assert status["phase"] == "Failed" and failed[0]["reason"] == "PermanentError", status
    assert "reward.callable: no module named x" in failed[0]["message"]
    assert "cancelled" in failed[0]["message"]
    assert len(r.timeline.times("pod_started")) == 3  # no second gang


def test_retryable_errors_stop_at_max_restarts(tmp_path):
    r = runner(tmp_path, manifest(max_restarts=1), env={"FAKE_EXIT_CODE": "1", "FAKE_EXIT_MESSAGE": "boom"})
    status = r.run(timeout=60)
    assert status["phase"] == "Failed" and status["restarts"] == 1
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["ReachedMaxRestarts"]
    assert len(r.timeline.times("pod_started")) == 6  # the first gang and one restart


def test_suspend_mid_run_then_resume_continues_from_checkpoint(tmp_path):
    r = runner(tmp_path, manifest(max_steps=10, interval=2), env={"FAKE_STEP_SECONDS": "0.2"}, suspend_after_step=5)
    status = r.run(timeout=60)
    assert status["phase"] == "Succeeded"
    phases = [d for _, w, d in r.timeline.entries if w == "phase"]
    assert "Suspended" in phases and phases[-1] == "Succeeded"
    h = report.history(report.read_jsonl(tmp_path / "fake-ppo" / "checkpoints" / "metrics" / "actor-0.jsonl"))
    assert h.last_step == 10
    # resumed from a checkpoint: at most one interval redone, not started over from step 1
    assert h.restarts == 1 and h.steps_redone[0] <= 2
    assert h.rows[0]["step"] == 1 and min(r["step"] for r in h.rows[5:]) > 1


def test_a_rerun_on_the_same_folder_does_not_announce_the_last_runs_alarms_again(tmp_path):
    # The last run's actor reported an alarm (and the event said so then); rerunning resumes the job.
    metrics = tmp_path / "fake-ppo" / "checkpoints" / "metrics"
    metrics.mkdir(parents=True)
    alarm = {"NegativeKL": "mean KL -0.2 < -0.05"}
    (metrics / "actor-0.jsonl").write_text(json.dumps({"step": 2, "kl": -0.2, "alarms": alarm}) + "\n")
    r = runner(tmp_path, manifest(max_steps=4, interval=2))
    assert r.job.status["progress"]["alarms"] == alarm
    assert r.run(timeout=120)["phase"] == "Succeeded"
    assert "Warning NegativeKL" not in (tmp_path / "fake-ppo" / "events.log").read_text()
    # A fresh run on the folder starts with no alarm known.
    assert "progress" not in runner(tmp_path, manifest(), fresh=True).job.status


def test_suspend_control_file_holds_the_job(tmp_path):
    r = runner(tmp_path, manifest(max_steps=4))
    (tmp_path / "fake-ppo" / "SUSPEND").touch()
    for _ in range(6):
        r.reconcile_once()
    assert r.job.status["phase"] == "Suspended" and r.supervisor.processes() == {}
    (tmp_path / "fake-ppo" / "SUSPEND").unlink()
    assert r.run(timeout=60)["phase"] == "Succeeded"


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_cli_sigterm_stops_every_process_and_grandchild(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest(max_steps=1000)))
    env = {**os.environ, "FAKE_STEP_SECONDS": "0.2", "FAKE_CHILD_PIDFILE": "child.pid"}
    cli = subprocess.Popen(
        [sys.executable, "-m", "rlhf_operator.cli", "run-local", str(path), "--workdir", str(tmp_path / "runs"),
         "--no-progress", "--no-metrics-server", "--trainer-command", " ".join(FAKE)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pods = tmp_path / "runs" / "fake-ppo" / "pods"
    deadline = time.monotonic() + 30
    while len(list(pods.glob("*/child.pid"))) < 3 or not all(p.read_text() for p in pods.glob("*/child.pid")):
        assert time.monotonic() < deadline and cli.poll() is None, cli.stdout.read() if cli.poll() is not None else ""
        time.sleep(0.05)
    children = [int(p.read_text()) for p in pods.glob("*/child.pid")]
    assert all(alive(c) for c in children)
    cli.send_signal(signal.SIGTERM)
    out, _ = cli.communicate(timeout=30)
    assert cli.returncode == 1, out  # stopped before finishing: not Succeeded
    deadline = time.monotonic() + 10
    while any(alive(c) for c in children):
        assert time.monotonic() < deadline, "grandchildren survived the runner"
        time.sleep(0.05)


def test_cli_rejects_invalid_manifest_naming_the_field(tmp_path, capsys):
    bad = manifest()
    bad["spec"]["roles"][0]["replicas"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    from rlhf_operator import cli

    assert cli.main(["run-local", str(path), "--workdir", str(tmp_path)]) == 2
    assert "roles[0].replicas" in capsys.readouterr().err


def test_cli_refuses_a_job_needing_more_gpus_than_the_machine_shows(tmp_path, capsys, monkeypatch):
    obj = manifest()
    for role in obj["spec"]["roles"]:
        role["gpus"] = 1
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(obj))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    from rlhf_operator import cli

    assert cli.main(["run-local", str(path), "--workdir", str(tmp_path)]) == 2
    assert "its pods ask for 3 GPUs (actor 1 x 1, critic 1 x 1, reference 1 x 1;" in capsys.readouterr().err
    assert not (tmp_path / "fake-ppo" / "pods").exists()  # nothing started


def test_cli_says_a_job_asking_for_gpus_runs_on_the_cpus_of_a_machine_without_any(tmp_path, capsys, monkeypatch):
    obj = manifest()
    for role in obj["spec"]["roles"]:
        role["gpus"] = 1
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(obj))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, whatever this machine has
    from rlhf_operator import cli

    assert cli.main(["run-local", str(path), "--workdir", str(tmp_path), "--no-progress", "--no-metrics-server",
                     "--trainer-command", " ".join(FAKE)]) == 0
    assert ("its roles ask for GPUs (actor 1, critic 1, reference 1; roles[].gpus) but this machine shows none"
            in capsys.readouterr().err)


@pytest.mark.parametrize("text", ["kind: Pod\n", ": : :\n"])
def test_load_manifest_errors_name_the_file(tmp_path, text):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(local.LocalRunError, match="m.yaml"):
        local.load_manifests(path)


def test_on_a_gpu_machine_each_pod_sees_its_own_gpus(tmp_path):
    """Four GPUs (named to the supervisor on this CPU machine): the actor's pod asks for 2, the critic's and
    the reference's 1 each; each pod's processes see only its own, as under a device plugin."""
    started: dict[str, str] = {}

    class Recording(localexec.Supervisor):
        def start(self, spec):
            proc = super().start(spec)
            started[spec.name] = proc.spec.env["CUDA_VISIBLE_DEVICES"]
            return proc

    obj = manifest(max_steps=2)
    for role, gpus in zip(obj["spec"]["roles"], (2, 1, 1), strict=True):
        role.update(gpus=gpus, processesPerPod=1)
    assert runner(tmp_path, obj, supervisor=Recording(gpus=["0", "1", "2", "3"])).run(timeout=60)["phase"] == "Succeeded"
    assert set(started) == {"fake-ppo-actor-0", "fake-ppo-critic-0", "fake-ppo-reference-0"}
    assert len(started["fake-ppo-actor-0"].split(",")) == 2
    assert sorted(",".join(started.values()).split(",")) == ["0", "1", "2", "3"]  # disjoint, all handed out
