"""The test control plane itself (tests/controlplane): it leaves no process behind, neither when the
session that started it is killed nor after `python -m tests.controlplane up` and `down` by hand.
Each test starts a control plane of its own (the session's keeps running beside it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.controlplane import cluster, kube

# With the session's control plane on one test worker (conftest.py), not beside the other's trainers.
pytestmark = pytest.mark.xdist_group("control-plane")
REPO = Path(__file__).resolve().parents[2]
COMPONENTS = {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "provisioner"}


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_a_killed_session_takes_its_control_plane_along(tmp_path):
    script = ("import json, sys, time\nfrom tests.controlplane import cluster\n"
              "cp = cluster.start(sys.argv[1])\n"
              "print(json.dumps({n: p.pid for n, p in cp.processes.items()}), flush=True)\ntime.sleep(600)\n")
    session = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO, env=env())
    try:
        line = session.stdout.readline()
        assert line, f"the control plane did not start (exit {session.poll()})"
        pids = json.loads(line)
        assert set(pids) == COMPONENTS and all(alive(p) for p in pids.values())
    finally:
        session.kill()  # SIGKILL: no atexit, no finally: only PR_SET_PDEATHSIG is left to act
        session.wait()
    kube.wait_for(lambda: not [n for n, p in pids.items() if alive(p)], timeout=30, interval=0.2,
                  what="every component gone with the session")


def test_up_and_down_by_hand(tmp_path):
    run = [sys.executable, "-m", "tests.controlplane"]
    up = subprocess.run([*run, "up", "--dir", str(tmp_path / "cp")], capture_output=True, text=True, cwd=REPO,
                        env=env(), timeout=600)
    assert up.returncode == 0, up.stderr
    pids = json.loads((tmp_path / "cp" / "state.json").read_text())["pids"]
    try:
        assert set(pids) == COMPONENTS and all(alive(p) for p in pids.values())  # `up` exited, they did not
        kubeconfig = tmp_path / "cp" / "admin.kubeconfig"
        assert f"export KUBECONFIG={kubeconfig}" in up.stdout
        version = subprocess.run(["kubectl", "version", "-o", "json"], capture_output=True, text=True,
                                 env={**os.environ, "KUBECONFIG": str(kubeconfig),
                                      "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
        assert json.loads(version.stdout)["serverVersion"]["gitVersion"] == cluster.K8S_VERSION
    finally:
        down = subprocess.run([*run, "down", "--dir", str(tmp_path / "cp")], capture_output=True, text=True,
                              cwd=REPO, env=env(), timeout=120)
    assert down.returncode == 0 and "stopped: provisioner" in down.stdout, down.stdout + down.stderr
    kube.wait_for(lambda: not [n for n, p in pids.items() if alive(p)], timeout=30, interval=0.2,
                  what="every component stopped by down")
    assert not (tmp_path / "cp").exists()
