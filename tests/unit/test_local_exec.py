"""Pure parts of rlhf_operator.localexec (pod dict -> local process spec, process state -> pod status) and its port picker."""

import http.server
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rlhf_operator import localexec

POD = {
    "metadata": {"name": "j-actor-0", "namespace": "ns", "labels": {"rlhf.dev/role": "actor"}},
    "spec": {"containers": [{
        "name": "trainer", "command": ["python", "-m", "rlhf_trainer"],
        "env": [
            {"name": "RLHF_CONFIG", "value": "/etc/rlhf/config.json"},
            {"name": "RLHF_CHECKPOINT_DIR", "value": "/checkpoints"},
            {"name": "RLHF_ROLE_ADDRS", "value": "actor=j-actor-0.j.ns.svc:29500,critic=j-critic-0.j.ns.svc:29500"},
            {"name": "RLHF_BRIDGE_ADDR", "value": "j-actor-0.j.ns.svc:29501"},
            {"name": "RLHF_METRICS_PORT", "value": "9400"},
            {"name": "RLHF_ROLE", "value": "actor"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "RLHF_COLOCATED_ROLES"},  # value "" as a real API server stores it: no value key
        ],
    }]},
}


def fake_resolver(host, port):
    return "127.0.0.1", {"j-actor-0.j.ns.svc": 1000, "j-critic-0.j.ns.svc": 2000}[host] + port - 29500


def translate(tmp_path, **kw):
    return localexec.translate_pod(
        POD, mounts={"/etc/rlhf": tmp_path / "cfg", "/checkpoints": tmp_path / "ck"},
        resolve=fake_resolver, pod_ip="127.0.0.1", pod_dir=tmp_path / "pod", metrics_port=0,
        python="/py", base_env={"PATH": "/bin"}, **kw)


def test_translate_pod_rewrites_mounts_addresses_and_downward_api(tmp_path):
    spec = translate(tmp_path)
    assert spec.argv == ("/py", "-m", "rlhf_trainer")
    assert spec.env["RLHF_CONFIG"] == str(tmp_path / "cfg" / "config.json")
    assert spec.env["RLHF_CHECKPOINT_DIR"] == str(tmp_path / "ck")
    assert spec.env["RLHF_ROLE_ADDRS"] == "actor=127.0.0.1:1000,critic=127.0.0.1:2000"
    assert spec.env["RLHF_BRIDGE_ADDR"] == "127.0.0.1:1001"
    assert spec.env["RLHF_METRICS_PORT"] == "0"
    assert spec.env["POD_IP"] == "127.0.0.1" and spec.env["ME"] == "j-actor-0"
    assert spec.env["RLHF_ROLE"] == "actor" and spec.env["PATH"] == "/bin"
    assert spec.env["RLHF_COLOCATED_ROLES"] == ""
    assert spec.env["RLHF_TERMINATION_LOG"] == str(tmp_path / "pod" / "termination-log")


def test_translate_pod_command_override_for_tests(tmp_path):
    assert translate(tmp_path, command=["/py", "fake.py"]).argv == ("/py", "fake.py")


def test_a_secret_env_comes_from_the_runners_own_env(tmp_path):
    pod = {**POD, "spec": {"containers": [{"name": "trainer", "command": ["x"], "env": [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]}}
    spec = localexec.translate_pod(pod, mounts={}, resolve=fake_resolver, pod_ip="127.0.0.1", pod_dir=tmp_path,
                                   metrics_port=0, base_env={"WANDB_API_KEY": "from-the-shell"})
    assert spec.env["WANDB_API_KEY"] == "from-the-shell"
    spec = localexec.translate_pod(pod, mounts={}, resolve=fake_resolver, pod_ip="127.0.0.1", pod_dir=tmp_path,
                                   metrics_port=0, base_env={})
    assert "WANDB_API_KEY" not in spec.env


def test_unsupported_env_source_names_pod_and_var(tmp_path):
    pod = {**POD, "spec": {"containers": [{"name": "trainer", "command": ["x"], "env": [
        {"name": "TOKEN", "valueFrom": {"configMapKeyRef": {"name": "s", "key": "k"}}}]}]}}
    with pytest.raises(ValueError, match="j-actor-0.*TOKEN"):
        localexec.translate_pod(pod, mounts={}, resolve=fake_resolver, pod_ip="127.0.0.1",
                                pod_dir=tmp_path, metrics_port=0)


@pytest.mark.parametrize(("value", "expected"), [
    ("/etc/rlhf/config.json", "/L/cfg/config.json"),
    ("/etc/rlhf", "/L/cfg"),
    ("/etc/rlhfx", "/etc/rlhfx"),  # a prefix that is not a path component is no mount
    ("/checkpoints/sub/x", "/L/ck/sub/x"),
    ("tiny://llama", "tiny://llama"),
])
def test_rewrite_mount_path(value, expected):
    mounts = {"/etc/rlhf": Path("/L/cfg"), "/checkpoints": Path("/L/ck")}
    assert localexec.rewrite_mount_path(value, mounts) == expected


def test_local_addresses_are_stable_within_an_attempt_and_fresh_across_attempts():
    addrs = localexec.LocalAddresses()
    a0, a0_again = addrs.resolver("0"), addrs.resolver("0")
    first = a0("j-actor-0.j.ns.svc", 29500)
    assert a0_again("j-actor-0.j.ns.svc", 29500) == first
    assert a0("j-actor-0.j.ns.svc", 29501) != first
    assert addrs.resolver("1")("j-actor-0.j.ns.svc", 29500) != first


def test_rewrite_addresses_leaves_non_addresses():
    assert localexec.rewrite_addresses("", fake_resolver) == ""
    assert localexec.rewrite_addresses("nohost", fake_resolver) == "nohost"


class FakeProc:
    def __init__(self, code, message=""):
        self.exit_code, self.started_at, self.finished_at = code, "t0", "t1"
        self._message = message

    def termination_message(self):
        return self._message


@pytest.mark.parametrize(("code", "phase", "reason"), [
    (None, "Running", None), (0, "Succeeded", "Completed"), (65, "Failed", "Error"), (137, "Failed", "Error"),
])
def test_pod_status_phases(code, phase, reason):
    status = localexec.pod_status(FakeProc(code, "data.jsonl:3: bad"), "127.0.0.1")
    assert status["phase"] == phase and status["podIP"] == "127.0.0.1"
    state = status["containerStatuses"][0]["state"]
    if code is None:
        assert "running" in state
    else:
        assert state["terminated"]["exitCode"] == code and state["terminated"]["reason"] == reason
        assert state["terminated"]["message"] == "data.jsonl:3: bad"


def test_pod_status_without_process_is_pending():
    assert localexec.pod_status(None, "127.0.0.1") == {"phase": "Pending"}


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param(".", ["/srv/case"], id="the folder run-local runs in"),
    pytest.param("lib:/abs/site", ["/srv/case/lib", "/abs/site"], id="relative and absolute"),
    pytest.param(":/abs", ["/srv/case", "/abs"], id="an empty entry is the current folder"),
])
def test_absolute_search_path(value, expected):
    assert localexec.absolute_search_path(value, Path("/srv/case")).split(":") == expected


def test_a_relative_pythonpath_means_the_runners_folder_not_the_pods(tmp_path, monkeypatch):
    """`PYTHONPATH=. rlhf-operator run-local job.yaml`: a reward.callable module next to job.yaml."""
    monkeypatch.chdir(tmp_path)
    spec = localexec.translate_pod(
        POD, mounts={}, resolve=fake_resolver, pod_ip="127.0.0.1", pod_dir=tmp_path / "pod", metrics_port=0,
        python="/py", base_env={"PYTHONPATH": "."})
    assert spec.env["PYTHONPATH"] == str(tmp_path)
    assert spec.cwd == tmp_path / "pod"


@pytest.mark.parametrize(("value", "expected"), [
    ("0,1,2,3", ["0", "1", "2", "3"]), (" 2, 5,", ["2", "5"]), ("", []), ("GPU-8f0e", ["GPU-8f0e"]),
])
def test_visible_gpus_are_cuda_visible_devices_when_set(value, expected):
    assert localexec.visible_gpus({"CUDA_VISIBLE_DEVICES": value}) == expected


def test_no_gpus_without_cuda_visible_devices_or_nvidia_smi(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on it
    assert localexec.visible_gpus({}) == []


@given(visible=st.lists(st.sampled_from("01234567"), unique=True, max_size=8), busy_bits=st.integers(0, 255),
       count=st.integers(0, 9))
def test_assign_gpus_hands_out_free_gpus_or_names_the_shortage(visible, busy_bits, count):
    busy = {g for i, g in enumerate(visible) if busy_bits >> i & 1}
    free = [g for g in visible if g not in busy]
    if count > len(free):
        with pytest.raises(localexec.GpuShortage, match=f"pod p asks for {count} GPU"):
            localexec.assign_gpus(visible, busy, count, "p")
        return
    ids = localexec.assign_gpus(visible, busy, count, "p")
    assert len(ids) == len(set(ids)) == count and set(ids) <= set(free)


def test_translate_pod_reads_the_gpu_limit(tmp_path):
    assert translate(tmp_path).gpus == 0
    trainer = {**POD["spec"]["containers"][0], "resources": {"limits": {"nvidia.com/gpu": "4", "memory": "8Gi"}}}
    pod = {**POD, "spec": {"containers": [trainer]}}
    spec = localexec.translate_pod(pod, mounts={}, resolve=fake_resolver, pod_ip="127.0.0.1", pod_dir=tmp_path,
                                   metrics_port=0, base_env={})
    assert spec.gpus == 4


@pytest.mark.parametrize("text, expected", [
    ("32768\t60999\n", (32768, 60999)),
    ("1024 65535", (1024, 65535)),
    ("garbage", (32768, 60999)),  # unreadable: Linux's default
    ("", (32768, 60999)),
])
def test_ephemeral_range_reads_the_kernel_setting(text, expected):
    assert localexec.ephemeral_range(text) == expected


@pytest.mark.parametrize("ephemeral", [(32768, 60999), (15000, 65535), (1024, 65535), (20000, 30000)])
def test_picked_ports_stay_outside_the_ephemeral_range(ephemeral):
    low, high = ephemeral
    for ports in localexec.pickable_ports(ephemeral):
        assert ports and all(not low <= p <= high for p in (ports[0], ports[-1]))
        assert 1024 < ports[0] and ports[-1] <= 65535


def test_a_free_port_is_reserved_against_other_pickers_yet_its_server_binds_it():
    """The CI race (EADDRINUSE in a TCPStore): a port handed out must not be handed out again, by this
    process or a parallel one, before its server binds it; and the reservation must not stop that server."""
    low, high = localexec.ephemeral_range()
    ports = [localexec.free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= p <= high for p in ports)
    for port in ports:  # what another process's free_port probe does: a plain bind, refused
        with socket.socket() as probe, pytest.raises(OSError):
            probe.bind(("127.0.0.1", port))
    server = http.server.HTTPServer(("127.0.0.1", ports[0]), http.server.BaseHTTPRequestHandler)
    server.server_close()


def test_free_port_falls_back_to_the_kernel_when_no_port_lies_outside_its_range(monkeypatch):
    monkeypatch.setattr(localexec, "ephemeral_range", lambda: (1024, 65535))
    port = localexec.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the kernel's pick is not reserved: free to bind
