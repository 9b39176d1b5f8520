"""Session fixtures for the tiers that need a cluster (tests/integration, e2e), loaded as a plugin by
the repository's conftest.py so that one control plane serves the whole session. Fixtures are lazy:
a session of unit tests alone starts nothing.

- control_plane: etcd + kube-apiserver + kube-controller-manager + scheduler (cluster.py), built on
  first use; stopped at the end of the session, and killed with the session if it dies.
- rlhf_release: the chart installed with `helm install` (cluster-wide, as docs/install.md does it) and
  a kubeconfig holding a token of the chart's operator ServiceAccount, so an operator started with it
  has exactly the chart's RBAC rights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.controlplane import cluster, kube

CHART = cluster.REPO / "charts" / "rlhf-operator"
RELEASE, RELEASE_NAMESPACE = "rlhf-operator", "rlhf-system"
TRAINER_SA = "rlhf-trainer"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """The running control plane (cluster.ControlPlane); its component logs are under workdir/logs."""
    cp = cluster.start(tmp_path_factory.mktemp("controlplane"))
    try:
        yield cp
    finally:
        cluster.stop(cp)


@dataclass(frozen=True)
class Release:
    """The chart as installed: where, and how to run its operator outside the cluster."""

    name: str
    namespace: str
    service_account: str
    kubeconfig: Path  # a bound token of the operator's ServiceAccount
    args: tuple[str, ...]  # the Deployment's container args without the two listening ports

    def operator(self, cp: cluster.ControlPlane, log: Path, *extra: str, wait: bool = True) -> kube.Operator:
        """`rlhf-operator operator` with the chart's args (+ extra) as the chart's ServiceAccount."""
        return kube.start_operator(cp, log, *self.args, *extra, kubeconfig=self.kubeconfig, wait=wait)


def deployment_args(deployment: dict) -> tuple[str, ...]:
    """The operator container's args minus --metrics-port / --liveness, which the tests pick."""
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return tuple(a for a in args if not a.startswith(("--metrics-port=", "--liveness=")))


def install_release(cp: cluster.ControlPlane, workdir: Path, *helm_args: str, name: str = RELEASE,
                    namespace: str = RELEASE_NAMESPACE) -> Release:
    """`helm install` the chart (the API server validates every object against its OpenAPI schema)
    and return how to run its operator."""
    result = kube.helm(cp, "install", name, str(CHART), "-n", namespace, "--create-namespace",
                       "--wait=hookOnly", *helm_args)
    assert "STATUS: deployed" in result.stdout, result.stdout
    deployment = kube.get_json(cp, "deployment", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")
    [deployment] = deployment["items"]
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = kube.service_account_kubeconfig(cp, namespace, sa, workdir / f"{name}-operator.kubeconfig")
    return Release(name=name, namespace=namespace, service_account=sa, kubeconfig=kubeconfig,
                   args=deployment_args(deployment))


@pytest.fixture(scope="session")
def rlhf_release(control_plane, tmp_path_factory) -> Release:
    """The chart installed cluster-wide (the CRD comes with it) into rlhf-system."""
    release = install_release(control_plane, tmp_path_factory.mktemp("release"))
    kube.kubectl(control_plane, "wait", "--for=condition=Established", "crd/rlhfjobs.rlhf.dev", "--timeout=60s")
    return release
