"""Integration fixtures: the session's control plane with the chart installed (control_plane and
rlhf_release come from tests/controlplane/fixtures.py), the tier's job namespace, and one
`rlhf-operator operator` subprocess per test module running as the chart's ServiceAccount.

The job namespace enforces Pod Security `restricted` and pins its pods to the node pool
`rlhf.dev/pool=integration`, which has no node: the tier's pods are never scheduled, and the tests
write their status as a kubelet would (operator_kube.set_all). Scheduling is tested in e2e/.
Cluster fixtures live here and in tests/controlplane only, never in tests/unit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.controlplane` is imported from the repository root
    sys.path.insert(0, str(REPO))

from operator_kube import EXAMPLES, NODE_POOL, NS  # noqa: E402

from tests.controlplane import kube  # noqa: E402
from tests.controlplane.fixtures import TRAINER_SA  # noqa: E402


def priority_classes() -> list[dict]:
    """The PriorityClasses the examples name (a cluster admin creates them; admission refuses pods
    naming a class that does not exist)."""
    jobs = [d for f in EXAMPLES.glob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d]  # a file may hold a chain
    names = sorted({p for job in jobs if (p := job["spec"].get("scheduling", {}).get("priorityClassName"))})
    return [{"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": n}, "value": 1000}
            for n in names]


@pytest.fixture(scope="session")
def cluster(control_plane, rlhf_release):
    """The control plane, with the chart installed, the examples' PriorityClasses and the job namespace NS."""
    kube.kubectl(control_plane, "apply", "-f", "-", input=yaml.safe_dump_all(priority_classes()))
    kube.create_namespace(control_plane, NS, node_selector=NODE_POOL, service_accounts=[TRAINER_SA])
    return control_plane


@pytest.fixture(scope="module")
def operator(cluster, rlhf_release, tmp_path_factory, request):
    """`rlhf-operator operator` for the whole module, with the chart's args (plus the module's
    OPERATOR_ARGS) and the chart's RBAC; its log is printed when the module fails."""
    extra = getattr(request.module, "OPERATOR_ARGS", ())
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = rlhf_release.operator(cluster, log, *extra)
    failed_before = request.session.testsfailed
    yield op
    op.stop()
    if request.session.testsfailed > failed_before:
        print(f"\n--- operator log tail ({log}) ---\n{op.log_tail(6000)}")
