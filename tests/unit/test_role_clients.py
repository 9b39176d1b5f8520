"""rlhf_trainer.roles clients: submit() sends at once and reads the reply only when asked."""

import pytest
import torch
from rlhf_trainer.roles import LocalClient, RemoteClient


class RecordingBridge:
    """A bridge whose peer replies to each request with the op's name; records sends and receives."""

    def __init__(self, reply_op: str = "ok"):
        self.events, self.reply_op, self.queue = [], reply_op, []

    def send(self, dst, op, tensors=None, **meta):
        self.events.append(("send", dst, op))
        self.queue.append(op)

    def recv(self, src):
        op = self.queue.pop(0)
        self.events.append(("recv", src, op))
        if self.reply_op == "error":
            return "error", {}, {"message": "boom"}
        return "ok", {"x": torch.ones(1)}, {"op": op, "peak_memory_bytes": 5.0}


def test_a_submitted_request_is_sent_at_once_and_its_reply_read_at_result():
    bridge = RecordingBridge()
    client = RemoteClient(bridge, "critic", dst=3)
    pending = client.submit("train", {"returns": torch.zeros(2)}, step=1)
    assert bridge.events == [("send", 3, "critic.train")]  # the role works while the caller goes on
    bridge.events.append(("caller", None, "policy update"))
    out, meta = pending.result()
    assert bridge.events[-1] == ("recv", 3, "critic.train") and meta == {"op": "critic.train"}
    assert pending.result()[1] is meta  # read once
    assert client.peaks == {"critic_train_peak_memory_bytes": 5.0}


def test_a_failed_submitted_request_raises_at_result_naming_the_role():
    pending = RemoteClient(RecordingBridge("error"), "critic", dst=2).submit("train")
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
