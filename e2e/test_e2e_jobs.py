"""kubectl apply the tiny examples; the operator runs them through the (stand-in) kubelet to
Succeeded, with COMPLETE checkpoints and an exported model folder that loads."""

import subprocess
import sys

import pytest
from e2e_support import REAL, example, unique, wait_for

JOB_TIMEOUT = 420


def diagnostics(cluster, operator, name):
    """What to read when a job misbehaves: its status, events, the operator log, every pod run's log."""
    parts = [f"status: {((cluster.job(name) or {}).get('status'))}"]
    events = cluster.kubectl("get", "events", "-o", "custom-columns=REASON:.reason,MESSAGE:.message",
                             "--field-selector", f"involvedObject.name={name}", check=False).stdout
    parts.append(f"events:\n{events[-3000:]}")
    if operator is not None:
        parts.append(f"operator log:\n{operator.log_tail()}")
    if cluster.kubelet is not None:
        for pod, logs in sorted(cluster.kubelet.logs.items()):
            if pod.startswith(name + "-"):
                for log in logs:
                    lines = [x for x in log.read_text().splitlines() if not x.startswith("[rank0]:   ")]
                    parts.append(f"{pod}: " + "\n".join(lines[-8:])[-2000:])
    return "\n".join(parts)


def complete_steps(ckpt_dir):
    return sorted(int(p.parent.name.split("-")[1]) for p in ckpt_dir.glob("step-*/COMPLETE"))


@pytest.mark.parametrize("manifest", ["ppo-tiny.yaml", "dpo-tiny.yaml"])
def test_tiny_example_succeeds_with_checkpoints_and_a_loadable_export(cluster, operator, manifest):
    name = unique(manifest.split("-")[0])
    cluster.apply(example(manifest, name, maxSteps=4, checkpoint={"intervalSteps": 2, "keep": 2}))
    job = cluster.wait_phase(name, timeout=JOB_TIMEOUT)
    assert job["status"]["phase"] == "Succeeded", diagnostics(cluster, operator, name)
    assert job["status"].get("restarts", 0) == 0
    ckpt = cluster.checkpoint_dir(name)
    assert complete_steps(ckpt)[-1] == 4
    assert len(complete_steps(ckpt)) <= 2  # keep: 2
    export = ckpt / "export"
    assert (export / "config.json").exists(), sorted(p.name for p in ckpt.iterdir())
    load = subprocess.run(
        [sys.executable, "-c",
         "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
         "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
         "print(sum(p.numel() for p in m.parameters()), len(t))", str(export)],
        capture_output=True, text=True, timeout=120)
    assert load.returncode == 0, load.stderr[-2000:]
    assert int(load.stdout.split()[0]) > 0
    if not REAL:
        assert not [n for n in cluster.kubelet.running_pods() if n.startswith(name + "-")]


def test_deleting_a_running_job_stops_its_processes(cluster, operator):
    name = unique("ppo-del")
    cluster.apply(example("ppo-tiny.yaml", name, maxSteps=200))
    cluster.wait_phase(name, ("Running",), timeout=120)
    cluster.kubectl("delete", "rlhfjob", name, "--wait=false")
    wait_for(lambda: not cluster.pods(name), timeout=60, what=f"pods of {name} gone")
    if not REAL:
        wait_for(lambda: not [n for n in cluster.kubelet.running_pods() if n.startswith(name)],
                         timeout=30, what=f"processes of {name} stopped")
