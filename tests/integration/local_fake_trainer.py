"""A stand-in trainer for the local runner's tests: follows the env contract of docs/spec.md without
torch, so supervisor / loop / fault tests run in seconds. Never used by the product.

Behaviour: resumes from the newest step-N/COMPLETE under RLHF_CHECKPOINT_DIR, runs to
hyperparameters.max_steps appending one metrics JSON line per step (the first after a resume with
`resumed_from`), checkpoints every
checkpoint.interval_steps (every role writes step-N/<role>-<rank>/, actor rank 0 writes COMPLETE once
all roles did), actor rank 0 writes export/config.json at the end. Like the real trainer's bridge,
the gang is coupled: a process whose peer died (pid files under .fake-gang/<attempt>/) exits 1.
Knobs (env): FAKE_STEP_SECONDS (default 0.05); FAKE_EXIT_CODE + FAKE_EXIT_MESSAGE (exit at start
with that code after writing the message to RLHF_TERMINATION_LOG; FAKE_EXIT_ROLE limits that to one
role); FAKE_TERM_EXIT_CODE (on SIGTERM, write FAKE_EXIT_MESSAGE and exit with that code); FAKE_CHILD_PIDFILE (spawn a
sleeping grandchild and write its pid there, to prove whole process groups die).
Model paths of the config (model, reward_model) that are not tiny:// must be folders with a
config.json (a `fromJob` source's export, as the runner maps it), else exit 78 naming the path.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def newest_complete(ckpt: Path) -> int:
    steps = [int(p.parent.name.split("-")[1]) for p in ckpt.glob("step-*/COMPLETE")]
    return max(steps, default=0)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def lost_peer(gang: Path, wanted: list[str]) -> str | None:
    """A peer that started and is gone without finishing (what a broken bridge tells the real one)."""
    for name in wanted:
        pidfile = gang / name
        if pidfile.exists() and pidfile.read_text() and not (gang / f"{name}.done").exists():
            if not alive(int(pidfile.read_text())):
                return name
    return None


def main() -> int:
    role, rank = os.environ["RLHF_ROLE"], int(os.environ["RLHF_ROLE_RANK"])
    config = json.loads(Path(os.environ["RLHF_CONFIG"]).read_text())
    ckpt = Path(os.environ["RLHF_CHECKPOINT_DIR"])
    if os.environ.get("FAKE_CHILD_PIDFILE"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(os.environ["FAKE_CHILD_PIDFILE"]).write_text(str(child.pid))
    for key in ("model", "reward_model"):
        path = (config.get(key) or {}).get("path", "")
        if path and not path.startswith("tiny://") and not (Path(path) / "config.json").is_file():
            Path(os.environ["RLHF_TERMINATION_LOG"]).write_text(f"{key}.path {path}: no config.json there")
            return 78
    if os.environ.get("FAKE_TERM_EXIT_CODE"):
        def last_words(*_):
            Path(os.environ["RLHF_TERMINATION_LOG"]).write_text(os.environ.get("FAKE_EXIT_MESSAGE", ""))
            os._exit(int(os.environ["FAKE_TERM_EXIT_CODE"]))
        signal.signal(signal.SIGTERM, last_words)
    if os.environ.get("FAKE_EXIT_CODE") and os.environ.get("FAKE_EXIT_ROLE", role) == role:
        Path(os.environ["RLHF_TERMINATION_LOG"]).write_text(os.environ.get("FAKE_EXIT_MESSAGE", ""))
        return int(os.environ["FAKE_EXIT_CODE"])
    max_steps = config["hyperparameters"]["max_steps"]
    interval = config["checkpoint"]["interval_steps"]
    replicas = {name: r["replicas"] for name, r in config["roles"].items() if not r.get("colocate_with")}
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    wanted = [f"{r}-{i}" for r, n in replicas.items() for i in range(n)]
    gang = ckpt / ".fake-gang" / os.environ["RLHF_RESTART_ATTEMPT"]
    gang.mkdir(parents=True, exist_ok=True)
    (gang / f"{role}-{rank}").write_text(str(os.getpid()))
    metrics = ckpt / "metrics" / f"{role}-{rank}.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    start = newest_complete(ckpt)
    for step in range(start + 1, max_steps + 1):
        time.sleep(step_seconds)
        if lost := lost_peer(gang, wanted):
            print(f"peer {lost} is gone", file=sys.stderr)
            return 1
        row = {"step": step, "time": time.time(), "reward_mean": step / max_steps, "kl": 0.01 * step,
               "loss": 1.0 / step, "restart_attempt": int(os.environ["RLHF_RESTART_ATTEMPT"])}
        if start and step == start + 1:  # the real trainer's resume mark (docs/spec.md)
            row["resumed_from"] = float(start)
        with metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if step % interval == 0 or step == max_steps:
            mine = ckpt / f"step-{step}" / f"{role}-{rank}"
            mine.mkdir(parents=True, exist_ok=True)
            (mine / "state.json").write_text(json.dumps({"step": step}))
            if role == "actor" and rank == 0:
                deadline = time.monotonic() + 30
                while not all((ckpt / f"step-{step}" / w).is_dir() for w in wanted):
                    if time.monotonic() > deadline or lost_peer(gang, wanted):
                        return 1
                    time.sleep(0.01)
                (ckpt / f"step-{step}" / "COMPLETE").write_text(json.dumps({"step": step}))
    (gang / f"{role}-{rank}.done").touch()
    if role == "actor" and rank == 0:
        (ckpt / "export").mkdir(exist_ok=True)
        (ckpt / "export" / "config.json").write_text(json.dumps({"model_type": "fake"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
