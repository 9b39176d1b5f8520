"""Launch a job's roles as separate local `python -m rlhf_trainer` processes with the env contract.

    config = trainer_config("ppo", hyperparameters={"max_steps": 2})
    run = launch(config, tmp_path)
    assert run.ok, run.describe()

Each process with pods of its own (roles without colocate_with, times replicas) gets the env of
docs/spec.md: its own world's rank-0 address on a free loopback port, the bridge address (actor
rank 0 hosts it), the shared checkpoint folder. When one process fails, the others are killed (they
would wait on the bridge for a long time otherwise).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_contract.algorithms import ALGORITHMS, ROLE_NAMES, required_roles
from rlhf_operator.localexec import free_port

# The synthetic dataset of each kind of data an algorithm consumes.
DATASET_OF_KIND = {"prompts": "synthetic://arithmetic", "pairs": "synthetic://preferences",
                   "sft": "synthetic://instructions", "steps": "synthetic://partial_sum_steps"}
# Small and fast: a few steps of a tiny model on CPU.
FAST_HYPERPARAMETERS = {
    "max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "max_prompt_length": 48, "max_new_tokens": 4,
    "learning_rate": 1e-3, "group_size": 2,
}


def trainer_config(algorithm: str, *, roles: dict | None = None, hyperparameters: dict | None = None,
                   reward_model: str | None = None, **overrides) -> dict:
    """A trainer config JSON dict (docs/spec.md) for `algorithm`, with a rule reward by default."""
    config = {
        "job": f"test-{algorithm}",
        "namespace": "default",
        "algorithm": algorithm,
        "model": {"path": "tiny://llama"},
        "reward_model": {"path": reward_model} if reward_model else None,
        "reward": {"type": "model" if reward_model else "rule", "rule": "" if reward_model else "exact_match"},
        "dataset": {"path": DATASET_OF_KIND[ALGORITHMS[algorithm].data], "format": "prompts"},
        "roles": roles or {r: {"replicas": 1} for r in required_roles(algorithm, "model" if reward_model else "rule")},
        "hyperparameters": {**FAST_HYPERPARAMETERS, **(hyperparameters or {})},
        "checkpoint": {"interval_steps": 1, "keep": 2},
    }
    config.update(copy.deepcopy(overrides))
    return config


def processes_of(config: dict) -> list[tuple[str, int, int, list[str]]]:
    """(role, rank, replicas, colocated roles) of every process, actor first."""
    roles = config["roles"]
    out = []
    for role in ROLE_NAMES:
        spec = roles.get(role)
        if spec is None or spec.get("colocate_with"):
            continue
        colocated = sorted(r for r, s in roles.items() if s.get("colocate_with") == role)
        for rank in range(spec.get("replicas", 1)):
            out.append((role, rank, spec.get("replicas", 1), colocated))
    return out


@dataclass
class Run:
    checkpoint_dir: Path
    returncodes: dict[str, int] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    termination: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.returncodes) and all(rc == 0 for rc in self.returncodes.values())

    def describe(self) -> str:
        return "\n".join(f"--- {name} rc={self.returncodes.get(name)}\n{log[-4000:]}" for name, log in self.logs.items())

    def metrics(self, role: str = "actor", rank: int = 0) -> list[dict]:
        path = self.checkpoint_dir / "metrics" / f"{role}-{rank}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def launch(config: dict, workdir: Path, *, checkpoint_dir: Path | None = None, restart_attempt: int = 0,
           timeout: float = 300, extra_env: dict | None = None, config_text: str | None = None,
           while_running=None, kill_on_failure: bool = True) -> Run:
    """Run every process of the job to completion (or first failure) and collect exit codes and logs.

    while_running(run, processes): called every 0.1 s with the live processes by name (to signal them);
    kill_on_failure=False lets the others finish when one exits non-zero (a stopped gang exits 143)."""
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = checkpoint_dir or workdir / "checkpoints"
    config_path = workdir / "config.json"
    config_path.write_text(config_text if config_text is not None else json.dumps(config, indent=1))
    procs = processes_of(config) if config_text is None else [("actor", 0, 1, [])]
    role_ports = {role: free_port() for role, *_ in procs}
    common = {
        **os.environ,
        "RLHF_JOB": config.get("job", "test"),
        "RLHF_CONFIG": str(config_path),
        "RLHF_ROLE_ADDRS": ",".join(f"{r}=127.0.0.1:{p}" for r, p in role_ports.items()),
        "RLHF_BRIDGE_ADDR": f"127.0.0.1:{free_port()}",
        "RLHF_CHECKPOINT_DIR": str(checkpoint_dir),
        "RLHF_RESTART_ATTEMPT": str(restart_attempt),
        "RLHF_METRICS_PORT": "0",
        # Several processes share 2 cores: one thread each avoids oversubscription.
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    }
    run = Run(checkpoint_dir)
    running: dict[str, subprocess.Popen] = {}
    files = {}
    start = time.monotonic()
    for role, rank, replicas, colocated in procs:
        name = f"{role}-{rank}"
        env = {**common, "RLHF_ROLE": role, "RLHF_ROLE_RANK": str(rank), "RLHF_ROLE_REPLICAS": str(replicas),
               "RLHF_COLOCATED_ROLES": ",".join(colocated),
               "RLHF_TERMINATION_LOG": str(workdir / f"termination-{name}.log"), **(extra_env or {})}
        files[name] = open(workdir / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        running[name] = subprocess.Popen([sys.executable, "-m", "rlhf_trainer"], env=env, stdout=files[name],
                                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while running and time.monotonic() - start < timeout:
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    run.returncodes[name] = proc.returncode
                    del running[name]
                    if proc.returncode != 0 and kill_on_failure:
                        _kill_all(running, run)
            if while_running is not None and running:
                while_running(run, running)
            time.sleep(0.1)
    finally:
        if running:  # timed out: have each one print where it waits, then kill
            for proc in running.values():
                proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
        _kill_all(running, run)
        for f in files.values():
            f.close()
    run.seconds = time.monotonic() - start
    for name in files:
        run.logs[name] = (workdir / f"{name}.log").read_text()
        term = workdir / f"termination-{name}.log"
        if term.exists():
            run.termination[name] = term.read_text()
    return run


def _kill_all(running: dict[str, subprocess.Popen], run: Run) -> None:
    for name, proc in list(running.items()):
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this process and its children
        except ProcessLookupError:
            pass
        proc.wait()
        run.returncodes[name] = proc.returncode
        del running[name]
