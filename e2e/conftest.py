"""End-to-end fixtures: the cluster (API emulator + stand-in kubelet, or a real one) and the operator
subprocess. Helpers live in e2e_support.py (a unique module name: tests/ has conftest.py files too).
"""

from __future__ import annotations

import pytest
from e2e_support import NAMESPACE, OPERATOR_IN_CLUSTER, REAL, Cluster, OperatorProcess, crd_paths, harness


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if REAL:
        yield Cluster(emu=None)
        return
    from kubelet import StandInKubelet  # e2e/kubelet.py

    work = tmp_path_factory.mktemp("cluster")
    emu = harness.start_emulator(work)
    try:
        harness.install_crds(emu, crd_paths())
        kubelet = StandInKubelet(emu.kubeconfig, work / "node", NAMESPACE).start()
        try:
            yield Cluster(emu=emu, kubelet=kubelet, workdir=work)
        finally:
            kubelet.stop()
    finally:
        harness.stop_emulator(emu)


@pytest.fixture(scope="session")
def operator(cluster, tmp_path_factory):
    if OPERATOR_IN_CLUSTER:
        yield None
        return
    op = OperatorProcess(cluster, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


