"""Certificates and keys for a loopback control plane, made with the openssl CLI.

What controller-runtime's envtest makes (pkg/internal/testing/controlplane: a CA, a serving
certificate for 127.0.0.1, a client certificate for an admin in `system:masters`, a service-account
key pair), plus one client certificate per control-plane component, so that kube-controller-manager
and the scheduler run under their own RBAC identities (`system:kube-controller-manager`,
`system:kube-scheduler`, bound by the API server's bootstrap roles) as in a kubeadm cluster.

EC P-256 keys throughout: openssl makes one in milliseconds, and the API server accepts ECDSA keys
for serving, client certificates and service-account token signing (ES256). openssl rather than the
`cryptography` package: it is on every Debian machine and the project's venv does not carry
`cryptography`.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = 30  # long enough for a developer's `up` cluster; every session makes a fresh CA
SERVICE_IP = "10.0.0.1"  # first address of the API server's --service-cluster-ip-range (10.0.0.0/24)
SERVING_NAMES = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local")


@dataclass(frozen=True)
class Credential:
    """A client certificate and its key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Every file the control plane's flags and kubeconfigs name."""

    ca_cert: Path
    ca_key: Path
    serving: Credential  # kube-apiserver's serving certificate (127.0.0.1, localhost, kubernetes.default...)
    sa_key: Path  # service-account token signing key (private), kube-apiserver + controller-manager
    sa_pub: Path  # its public half, kube-apiserver --service-account-key-file
    clients: dict[str, Credential]  # user name -> client certificate (admin, controller-manager, scheduler)


# user name -> (CN, O): the identities the control plane and the tests use.
CLIENTS = {
    "admin": ("rlhf-admin", "system:masters"),
    "kube-controller-manager": ("system:kube-controller-manager", ""),
    "kube-scheduler": ("system:kube-scheduler", ""),
}


def openssl(*args: str, cwd: Path) -> None:
    """Run openssl; raise RuntimeError with its stderr when it fails."""
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("openssl not found on PATH: the test control plane makes its certificates with it "
                           "(Debian: apt-get install openssl)")
    result = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


def _ec_key(cwd: Path, name: str) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=cwd)


def _issue(cwd: Path, name: str, subject: str, extensions: list[str]) -> Credential:
    """A key `name.key` and a certificate `name.crt` signed by ca.key, with the given extensions."""
    _ec_key(cwd, name)
    ext_args = [a for ext in extensions for a in ("-addext", ext)]
    openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, *ext_args, "-out", f"{name}.csr", cwd=cwd)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-copy_extensions", "copyall", "-days", str(DAYS), "-out", f"{name}.crt", cwd=cwd)
    (cwd / f"{name}.csr").unlink()
    return Credential(cert=cwd / f"{name}.crt", key=cwd / f"{name}.key")


def subject(cn: str, org: str = "") -> str:
    """An openssl -subj string: `/O=org/CN=cn` (O is a Kubernetes group, CN the user name)."""
    return (f"/O={org}" if org else "") + f"/CN={cn}"


def make_pki(folder: Path) -> Pki:
    """Create the CA, the API server's serving certificate, the service-account key pair and the
    client certificates of CLIENTS in `folder` (created if missing). Raises RuntimeError when
    openssl is missing or fails."""
    cwd = Path(folder)
    cwd.mkdir(parents=True, exist_ok=True)
    _ec_key(cwd, "ca")
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=rlhf-test-ca", "-days", str(DAYS),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", "ca.crt", cwd=cwd)
    sans = ",".join([f"IP:127.0.0.1,IP:{SERVICE_IP}"] + [f"DNS:{n}" for n in SERVING_NAMES])
    serving = _issue(cwd, "apiserver", "/CN=kube-apiserver",
                     [f"subjectAltName={sans}", "extendedKeyUsage=serverAuth",
                      "keyUsage=critical,digitalSignature,keyEncipherment"])
    clients = {user: _issue(cwd, user, subject(cn, org),
                            ["extendedKeyUsage=clientAuth", "keyUsage=critical,digitalSignature,keyEncipherment"])
               for user, (cn, org) in CLIENTS.items()}
    _ec_key(cwd, "sa")
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=cwd)
    return Pki(ca_cert=cwd / "ca.crt", ca_key=cwd / "ca.key", serving=serving, sa_key=cwd / "sa.key",
               sa_pub=cwd / "sa.pub", clients=clients)
