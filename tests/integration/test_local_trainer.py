"""The local runner with the real trainer (`python -m rlhf_trainer`, tiny CPU models): the README's
first command as a new user runs it, a random kill resumes from the newest complete checkpoint, a
corrupt newest checkpoint falls back to the previous complete one, permanent errors fail once."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rlhf_operator import local, localfaults, report

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT = 600


def manifest(example="ppo-tiny.yaml", max_steps=4, interval=2, keep=3, **spec):
    obj = yaml.safe_load((REPO / "crds" / "examples" / example).read_text())
    obj["spec"]["hyperparameters"]["maxSteps"] = max_steps
    obj["spec"]["checkpoint"].update(intervalSteps=interval, keep=keep)
    obj["spec"].update(spec)
    return obj


def run(obj, workdir):
    runner = local.LocalRunner(obj, workdir, serve_metrics=False)
    return runner, runner.run(timeout=RUN_TIMEOUT)


def pod_logs(runner):
    return "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in sorted(runner.run_dir.glob("pods/*/log.txt")))


def readme_first_command() -> list[str]:
    """`run-local MANIFEST` from the first bash block of README.md (what a new user copies)."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return re.search(r"rlhf-operator (run-local \S+)", block).group(1).split()


@pytest.mark.timeout(1500)  # 150 PPO steps: ~2 minutes on 2 idle cores, much longer on a shared machine
def test_readme_first_command_as_a_new_user(tmp_path):
    args = readme_first_command()
    shutil.copytree(REPO / "crds", tmp_path / "crds")  # a fresh clone's files, nothing else
    exe = Path(sys.executable).with_name("rlhf-operator")
    done = run_cli([str(exe), *args], cwd=tmp_path, timeout=1200)
    name = yaml.safe_load((tmp_path / args[1]).read_text())["metadata"]["name"]
    run_dir = tmp_path / "runs" / name
    logs = "\n".join(p.read_text()[-2000:] for p in run_dir.glob("pods/*/log.txt"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:] + logs
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "Succeeded"
    # What the policy writes: samples on the volume, the newest one short in the status.
    assert status["progress"]["lastSample"].startswith("step 150: "), status["progress"]
    assert "newest samples" in done.stdout
    assert list((run_dir / "checkpoints" / "tensorboard" / "actor-0").glob("events.out.tfevents.*"))
    assert (run_dir / "report.png").read_bytes()[:8] == PNG
    assert f"{name}: Succeeded" in done.stdout and "report:" in done.stdout
    assert (run_dir / "checkpoints" / "export" / "config.json").exists()
    # The demo visibly learns: the report's learning figures (what README.md shows).
    before, after = figure(done.stdout, "reward (mean of first / last 5 steps)")
    assert after >= before + 0.5, done.stdout[-3000:]
    greedy_before, greedy_after = figure(done.stdout, "held-out reward (greedy) (first / last evaluation)")
    assert greedy_after >= greedy_before + 0.5, done.stdout[-3000:]


def run_cli(argv: list[str], *, cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an `rlhf-operator` command; past `timeout` it gets SIGTERM (run-local then stops its pods'
    process groups, as on Ctrl-C) before the test fails, so no trainer outlives the test."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{' '.join(argv)}: not done after {timeout} s\n{out[-3000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def figure(stdout: str, label: str) -> tuple[float, float]:
    """(before, after) of a report summary line `label: BEFORE -> AFTER (+CHANGE)`."""
    match = re.search(re.escape(label) + r": (\S+) -> (\S+) ", stdout)
    assert match, f"no {label!r} in the report:\n{stdout[-3000:]}"
    return float(match[1]), float(match[2])


def test_corrupt_checkpoint_falls_back_then_a_random_kill_resumes(tmp_path):
    """Two faults, one job: the newest checkpoint is truncated between runs (fall back to the previous
    complete one), then a role process is SIGKILLed mid-run (the gang restarts from the newest one)."""
    runner, status = run(manifest(max_steps=4, interval=2), tmp_path)
    assert status["phase"] == "Succeeded", pod_logs(runner)
    ckpt = runner.checkpoint_dir
    assert (ckpt / "step-2" / "COMPLETE").exists() and (ckpt / "step-4" / "COMPLETE").exists()
    # Truncate the biggest file of the actor's newest checkpoint, as a crash mid-copy would.
    files = [p for p in (ckpt / "step-4" / "actor").rglob("*") if p.is_file() and p.name != "MANIFEST.json"]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # The same job asked for more steps (a tiny PPO step takes ~0.1 s: 40 leave room for a kill).
    runner = local.LocalRunner(manifest(max_steps=40, interval=5), tmp_path, serve_metrics=False)
    result = localfaults.run_with_kills(runner, kills=1, rng=random.Random(3), max_delay=1.0, timeout=RUN_TIMEOUT)
    assert result.ok(), f"{result}\n{pod_logs(runner)}"
    # Training rows only: the step-0 row is the held-out evaluation of the initial policy.
    steps = [r["step"] for r in report.read_jsonl(ckpt / "metrics" / "actor-0.jsonl") if "loss" in r]
    assert steps[:5] == [1, 2, 3, 4, 3], steps  # resumed from step 2, not from the corrupt step 4
    assert "unusable" in (runner.run_dir / "pods" / "ppo-tiny-actor-0" / "log.txt").read_text()
    assert len(result.kills) == 1 and result.restarts == 1 and all(r <= 5 for r in result.steps_redone)


def assert_failed_once(runner, status, needle, pods):
    assert status["phase"] == "Failed", pod_logs(runner)
    assert status.get("restarts", 0) == 0, pod_logs(runner)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentError" and needle in failed["message"], failed
    assert len(runner.timeline.times("pod_started")) == pods  # one gang, no restart loop


@pytest.mark.parametrize("case", ["data", "config", "quantized-base-without-bitsandbytes"])
def test_permanent_error_fails_once_and_names_where(tmp_path, case, monkeypatch):
    """A one-pod gang (SFT): the trainer's exit code alone decides."""
    if case == "quantized-base-without-bitsandbytes":
        from test_trainer_errors import without_bitsandbytes

        monkeypatch.setenv("PYTHONPATH", without_bitsandbytes()["PYTHONPATH"])  # the pods inherit it
        obj = manifest("sft-tiny.yaml")
        obj["spec"]["roles"][0]["lora"] = {"rank": 4, "quantization": "8bit"}
        needle = "roles.actor.lora.quantization: 8bit"
    elif case == "data":
        data = tmp_path / "instructions.jsonl"
        good = {"instruction": "add", "input": "1+1", "output": "2"}
        data.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "add"}) + "\n")
        obj = manifest("sft-tiny.yaml", dataset={"path": str(data), "format": "instruction"})
        needle = "instructions.jsonl:2"
    else:
        obj = manifest("sft-tiny.yaml", model={"path": str(tmp_path / "no-such-model")})
        needle = "no-such-model"
    runner, status = run(obj, tmp_path / "runs")
    assert_failed_once(runner, status, needle, pods=1)


def test_permanent_error_in_a_multi_role_gang_is_not_retried(tmp_path):
    """The actor exits 78; its peers see the bridge close and exit 1, often before the actor's own
    exit shows. The planner lets a failing gang settle, so the permanent code still decides."""
    obj = manifest(reward={"type": "rule", "rule": "callable", "callable": "no_such_module_here:score"},
                   failurePolicy={"maxRestarts": 1, "backoffSeconds": 1})  # a lost race costs one gang, not three
    runner, status = run(obj, tmp_path / "runs")
    assert_failed_once(runner, status, "reward.callable", pods=3)


def test_nan_reward_case_fails_naming_the_step_the_reward_and_the_row(tmp_path):
    """tests/integration/cases/nan-reward, as users ran it (`PYTHONPATH=.` from the case's folder): a
    callable reward returns NaN for one response in eight. It used to end Succeeded with NaN losses
    and the initial weights exported; now the first step fails it for good (exit 65)."""
    case = tmp_path / "case"
    shutil.copytree(REPO / "tests" / "integration" / "cases" / "nan-reward", case)
    exe = Path(sys.executable).with_name("rlhf-operator")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (".", os.environ.get("PYTHONPATH", "")) if p)}
    done = run_cli([str(exe), "run-local", "job.yaml", "--workdir", "runs", "--fresh", "--no-progress"],
                   cwd=case, env=env, timeout=RUN_TIMEOUT)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-2000:]
    assert "grpo-nan-reward: Failed" in done.stdout
    failed = [line for line in done.stdout.splitlines() if line.startswith("  PermanentError:")]
    assert failed, done.stdout[-3000:]
    assert "exit code 65" in failed[0]
    assert "step 1: non-finite reward: scores from reward.callable nan_reward:score" in failed[0]
    assert re.search(r"row 0 \(synthetic://arithmetic#\d+, prompt '\d\+\d=', response '.*'\): nan", failed[0])
    run_dir = case / "runs" / "grpo-nan-reward"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "Failed"
    assert not (run_dir / "checkpoints" / "export").exists()
