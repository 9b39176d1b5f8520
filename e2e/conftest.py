"""End-to-end fixtures: the cluster (the test control plane + a stand-in kubelet, or a real one) and
the operator subprocess (the chart's, installed watching the e2e namespace). Helpers live in
e2e_support.py (a unique module name: tests/ has conftest.py files too). control_plane comes from
tests/controlplane/fixtures.py.
"""

from __future__ import annotations

import pytest
import yaml
from e2e_support import NAMESPACE, NODE_POOL, OPERATOR_IN_CLUSTER, REAL, Cluster, OperatorProcess, kube

from tests.controlplane.fixtures import install_release


@pytest.fixture(scope="session")
def cluster(request, tmp_path_factory):
    if REAL:
        yield Cluster(cp=None)
        return
    from kubelet import StandInKubelet  # e2e/kubelet.py

    cp = request.getfixturevalue("control_plane")
    work = tmp_path_factory.mktemp("cluster")
    # kubectl's context namespace is the job namespace, as a user's would be.
    config = yaml.safe_load(cp.kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = NAMESPACE
    kubeconfig = work / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    kube.create_namespace(cp, NAMESPACE, node_selector=NODE_POOL)
    # The operator of the e2e tier: the chart watching the e2e namespace only (a Role there, the
    # trainer's ServiceAccount created there by the chart; the CRD too unless a release came first).
    release = install_release(cp, work, "--set", f"watchNamespaces={{{NAMESPACE}}}", name="e2e",
                              namespace="rlhf-e2e-system")
    kubelet = StandInKubelet(cp.kubeconfig, work / "node", "e2e-node-0", node_labels=NODE_POOL).start()
    try:
        yield Cluster(cp=cp, kubelet=kubelet, workdir=work, kubeconfig=kubeconfig, release=release)
    finally:
        kubelet.stop()


@pytest.fixture(scope="session")
def operator(cluster, request, tmp_path_factory):
    if OPERATOR_IN_CLUSTER:
        yield None
        return
    op = OperatorProcess(cluster, tmp_path_factory.mktemp("operator") / "operator.log", cluster.release)
    op.start()
    yield op
    op.stop()
