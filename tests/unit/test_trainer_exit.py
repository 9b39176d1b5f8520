"""What a retryably failing trainer process leaves in its termination log (errors.retryable_summary).

The kubelet (or run-local) shows that file as the pod's termination message, and the operator puts it in
the PodFailed event and the job's status. A process-group timeout used to show only "exit code 1" and a
traceback in the pod's log naming a socket.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist
from rlhf_contract import wire
from rlhf_operator.localexec import free_port
from rlhf_trainer import __main__ as entry
from rlhf_trainer.errors import retryable_summary


def store_timeout() -> Exception:
    """The error the bridge's TCPStore raises when a peer never sets its key (a real one, 1 s)."""
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=1))
    try:
        store.get("the-peer-never-writes-this")
    except Exception as exc:  # noqa: BLE001 (whatever torch calls it: the summary must recognise it)
        return exc
    raise AssertionError("the store answered a key nobody set")


@pytest.mark.parametrize("make_error", [
    store_timeout,
    lambda: RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                         "60000ms for send operation to complete"),
    lambda: RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, "
                         "OpType=ALLREDUCE) ran for 600016 milliseconds before timing out."),
])
def test_a_process_group_timeout_names_the_knob_and_its_value(make_error):
    line = retryable_summary(make_error(), 60)
    assert line.startswith("a collective or bridge message waited longer than "
                           "hyperparameters.distributedTimeoutSeconds (60 s)"), line
    assert len(line) <= 1000


def test_other_errors_give_their_type_and_last_line():
    assert retryable_summary(ValueError("loading\nshard 3 is truncated"), 60) == "ValueError: shard 3 is truncated"
    assert retryable_summary(KeyError("x"), None) == "KeyError: 'x'"
    assert "distributedTimeoutSeconds" not in retryable_summary(RuntimeError("CUDA error: an illegal memory access"), 60)


def test_the_entry_point_writes_the_summary_and_still_fails_retryably(tmp_path, monkeypatch):
    """main() re-raises (exit 1, a gang restart) after writing the line; before the config is read the
    knob is named without a value."""
    log = tmp_path / "termination-log"

    def timed_out(_env):
        raise RuntimeError("Timed out waiting 1800000ms for recv operation to complete")

    monkeypatch.setattr("rlhf_trainer.distributed.read_process_env", timed_out)
    with pytest.raises(RuntimeError, match="Timed out"):
        entry.main({wire.ENV_TERMINATION_LOG: str(log)})
    assert log.read_text().startswith("rlhf_trainer: a collective or bridge message waited longer than "
                                      "hyperparameters.distributedTimeoutSeconds: ")
