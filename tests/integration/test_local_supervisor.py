"""rlhf_operator.localexec.Supervisor with real processes: exit codes, messages, no orphans."""

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from rlhf_operator import localexec


def spec(tmp_path: Path, name: str, code: str, env=None) -> localexec.ProcessSpec:
    pod_dir = tmp_path / name
    return localexec.ProcessSpec(
        name=name, argv=(sys.executable, "-c", code), env={**os.environ, **(env or {})},
        cwd=pod_dir, log_path=pod_dir / "log.txt", termination_log=pod_dir / "termination-log")


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """True while the pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_exit_codes_messages_and_changed_event(tmp_path):
    sup = localexec.Supervisor()
    ok = sup.start(spec(tmp_path, "ok", "print('hi')"))
    bad = sup.start(spec(tmp_path, "bad", (
        "import os, sys; open(os.environ['TL'], 'w').write('data.jsonl:7: missing prompt'); sys.exit(65)"),
        env={"TL": str(tmp_path / "bad" / "termination-log")}))
    assert sup.changed.wait(10)
    wait_until(lambda: ok.exit_code is not None and bad.exit_code is not None)
    assert localexec.pod_status(ok, "127.0.0.1")["phase"] == "Succeeded"
    term = localexec.pod_status(bad, "127.0.0.1")["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 65 and term["message"] == "data.jsonl:7: missing prompt"
    assert (tmp_path / "ok" / "log.txt").read_text().strip() == "hi"


def test_killed_process_reads_137_and_stays_listed(tmp_path):
    sup = localexec.Supervisor()
    p = sup.start(spec(tmp_path, "victim", "import time; time.sleep(60)"))
    assert sup.kill("victim")
    wait_until(lambda: p.exit_code is not None)
    assert p.exit_code == 137
    assert localexec.pod_status(sup.get("victim"), "127.0.0.1")["phase"] == "Failed"


def test_stop_kills_whole_process_group_including_grandchildren(tmp_path):
    sup = localexec.Supervisor()
    pidfile = tmp_path / "child.pid"
    # The parent ignores SIGTERM so the SIGKILL escalation is exercised too.
    code = (
        "import signal, subprocess, sys, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        f"pathlib.Path({str(pidfile)!r}).write_text(str(c.pid)); time.sleep(600)")
    p = sup.start(spec(tmp_path, "parent", code))
    wait_until(lambda: pidfile.exists() and pidfile.read_text())
    child = int(pidfile.read_text())
    assert alive(child)
    t0 = time.monotonic()
    sup.stop(["parent"], grace=0.5)
    assert time.monotonic() - t0 < 5
    assert p.exit_code == 128 + signal.SIGKILL
    wait_until(lambda: not alive(child))
    assert sup.get("parent") is None and sup.processes() == {}


def test_stop_all_leaves_nothing(tmp_path):
    sup = localexec.Supervisor()
    procs = [sup.start(spec(tmp_path, f"p{i}", "import time; time.sleep(60)")) for i in range(3)]
    sup.stop_all(grace=2)
    assert all(not alive(p.popen.pid) for p in procs)
    assert all(p.exit_code == 128 + signal.SIGTERM for p in procs)


def test_each_pod_gets_gpus_no_running_pod_holds(tmp_path):
    """A machine of 3 GPUs: pods asking 2 and 1 get disjoint ones, a third finds none free, a pod asking
    none sees none, and a stopped or finished pod's GPUs go to the next."""
    sup = localexec.Supervisor(gpus=["0", "1", "2"])
    sleep = "import time; time.sleep(60)"
    a = sup.start(dataclasses.replace(spec(tmp_path, "a", sleep), gpus=2))
    b = sup.start(dataclasses.replace(spec(tmp_path, "b", sleep), gpus=1))
    assert (a.spec.env["CUDA_VISIBLE_DEVICES"], b.spec.env["CUDA_VISIBLE_DEVICES"]) == ("0,1", "2")
    with pytest.raises(localexec.GpuShortage, match="pod c asks for 1 GPU.*0 free of 3"):
        sup.start(dataclasses.replace(spec(tmp_path, "c", sleep), gpus=1))
    cpu = sup.start(spec(tmp_path, "cpu", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"))
    wait_until(lambda: cpu.exit_code is not None)
    assert (tmp_path / "cpu" / "log.txt").read_text().strip() == "''"
    sup.stop(["a"], grace=1)
    c = sup.start(dataclasses.replace(spec(tmp_path, "c", "pass"), gpus=2))
    assert c.spec.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    wait_until(lambda: c.exit_code is not None)  # finished: its GPUs are free again
    d = sup.start(dataclasses.replace(spec(tmp_path, "d", sleep), gpus=2))
    assert d.spec.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    sup.stop_all(grace=1)
