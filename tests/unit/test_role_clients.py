"""rlhf_trainer.roles clients: submit() lets the role work while the caller goes on."""

import threading

import pytest
import torch
from rlhf_trainer.roles import LocalClient, RemoteClient


class RecordingBridge:
    """A bridge whose peer replies to each request with its op; the reply arrives once `answered` is set."""

    device = torch.device("cpu")

    def __init__(self, reply_op: str = "ok"):
        self.events, self.reply_op, self.queue = [], reply_op, []
        self.answered = threading.Event()

    def send(self, dst, op, tensors=None, **meta):
        self.events.append(("send", dst, op, threading.current_thread().name))
        self.queue.append(op)

    def recv(self, src):
        assert self.answered.wait(10)
        op = self.queue.pop(0)
        self.events.append(("recv", src, op, threading.current_thread().name))
        if self.reply_op == "error":
            return "error", {}, {"message": "boom"}
        return "ok", {"x": torch.ones(1)}, {"op": op, "peak_memory_bytes": 5.0}


def test_a_submitted_request_runs_beside_the_caller_until_its_result_is_read():
    bridge = RecordingBridge()
    client = RemoteClient(bridge, "critic", dst=3)
    pending = client.submit("train", {"returns": torch.zeros(2)}, step=1)
    # The caller goes on while the reply has not come (a blocking receive here would never return).
    assert [e[:3] for e in bridge.events] in ([], [("send", 3, "critic.train")])
    bridge.answered.set()
    out, meta = pending.result()
    assert [e[:3] for e in bridge.events] == [("send", 3, "critic.train"), ("recv", 3, "critic.train")]
    assert {e[3] for e in bridge.events} == {"role-request"}  # both on the request's own thread
    assert meta == {"op": "critic.train"} and torch.equal(out["x"], torch.ones(1))
    assert pending.result()[1] is meta  # read once
    assert client.peaks == {"critic_train_peak_memory_bytes": 5.0}


def test_a_failed_submitted_request_raises_at_result_naming_the_role():
    bridge = RecordingBridge("error")
    bridge.answered.set()
    pending = RemoteClient(bridge, "critic", dst=2).submit("train")
    with pytest.raises(RuntimeError, match=r"critic \(bridge rank 2\) failed: boom"):
        pending.result()


def test_a_colocated_role_runs_the_submitted_request_when_its_result_is_read():
    calls = []

    class Service:
        def handle(self, method, tensors, meta):
            calls.append(method)
            return {}, {"value_loss": 1.0}

    pending = LocalClient(Service()).submit("train", step=2)
    assert calls == []  # after the caller's own work, as before
    assert pending.result() == ({}, {"value_loss": 1.0}) and calls == ["train"]
    assert pending.result() == ({}, {"value_loss": 1.0}) and calls == ["train"]
