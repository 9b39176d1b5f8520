"""The operator's API client (kube/executor.py KubeApi) against a small HTTPS server: TLS with the cluster's
CA and a client certificate (as a kubeconfig from kind gives), the bearer token and its refresh, request
bodies and paths, and the mapping of statuses and connection failures to results and ApiError."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp.web
import kubernetes
import pytest
from rlhf_operator.kube import executor
from rlhf_operator.kube.executor import ApiError, KubeApi, auth_headers
from rlhf_operator.localexec import free_port

OPENSSL = shutil.which("openssl")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def issue(cwd: Path, name: str, subject: str, ca: str, extension: str = "") -> None:
    """An EC key and a certificate for it signed by `ca` (name.key, name.crt)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", subject, cwd=cwd)
    ext = ["-extfile", f"{name}.ext"] if extension else []
    if extension:
        (cwd / f"{name}.ext").write_text(extension + "\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", *ext, cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A cluster CA, the API server's certificate for 127.0.0.1, a client certificate; and a second,
    unrelated CA for the negative case."""
    assert OPENSSL, "openssl is needed to make test certificates (Debian: apt-get install openssl)"
    cwd = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "1", "-subj", f"/CN={ca}", cwd=cwd)
    issue(cwd, "server", "/CN=kube-apiserver", "ca", "subjectAltName=IP:127.0.0.1")
    issue(cwd, "client", "/O=system:masters/CN=rlhf-operator", "ca")
    return cwd


class FakeApiServer:
    """Answers every request with the next queued (status, body), default 201 {}; records what it got."""

    def __init__(self):
        self.seen: list[dict] = []
        self.replies: list[tuple] = []  # (status, body) or (status, body, headers)

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in peer["subject"]) if peer else {}
        body = await request.text()
        self.seen.append({"method": request.method, "path": request.path, "query": dict(request.query),
                          "headers": dict(request.headers), "body": json.loads(body) if body else None,
                          "client_cn": subject.get("commonName")})
        status, reply, *headers = self.replies.pop(0) if self.replies else (201, {})
        return aiohttp.web.json_response(reply, status=status, headers=headers[0] if headers else None)


@pytest.fixture
async def https_server(pki):
    """The fake API server on https://127.0.0.1:<port>, requiring a client certificate from the cluster CA."""
    fake = FakeApiServer()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield fake, f"https://127.0.0.1:{port}"
    await runner.cleanup()


def client_config(pki: Path, host: str, ca: str = "ca") -> kubernetes.client.Configuration:
    config = kubernetes.client.Configuration()
    config.host = host
    config.ssl_ca_cert = str(pki / f"{ca}.crt")
    config.cert_file, config.key_file = str(pki / "client.crt"), str(pki / "client.key")
    config.api_key = {"authorization": "token-1"}
    config.api_key_prefix = {"authorization": "Bearer"}
    return config


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j-actor-0", "namespace": "ns"}, "spec": {}}


async def test_create_over_tls_with_client_certificate_and_token(pki, https_server):
    fake, host = https_server
    api = KubeApi(config=client_config(pki, host))
    try:
        assert await api.create(POD) is True
        fake.replies.append((409, {"kind": "Status", "reason": "AlreadyExists"}))
        assert await api.create(POD) is False  # idempotent: already there counts as done
    finally:
        await api.close()
    first = fake.seen[0]
    assert (first["method"], first["path"]) == ("POST", "/api/v1/namespaces/ns/pods")
    assert first["query"] == {"fieldManager": "rlhf-operator"}
    assert first["body"] == POD
    assert first["headers"]["Authorization"] == "Bearer token-1"
    assert first["headers"]["Content-Type"] == "application/json"
    assert first["client_cn"] == "rlhf-operator"


async def test_status_patch_delete_and_errors(pki, https_server):
    fake, host = https_server
    api = KubeApi(config=client_config(pki, host))
    try:
        # A job that is gone: the API server's NotFound Status names it (a bare 404 may be a missing route).
        gone = {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                "details": {"name": "gone", "group": "rlhf.dev", "kind": "rlhfjobs"}}
        stored = {"metadata": {"name": "j", "resourceVersion": "41"}, "status": {"phase": "Running", "restarts": 0}}
        fake.replies += [(200, stored), (404, gone), (404, {}), (200, {}), (404, {})]
        # The job as stored comes back: its new resourceVersion and status are what the operator trusts.
        assert await api.patch_job_status("ns", "j", {"phase": "Running"}) == stored
        assert await api.patch_job_status("ns", "gone", {"phase": "Running"}) is None  # the job itself is gone
        # A 404 that does not name the job (e.g. no status subresource) is an error, not a deletion.
        with pytest.raises(ApiError, match="HTTP 404"):
            await api.patch_job_status("ns", "gone", {"phase": "Running"})
        assert await api.delete("v1", "Pod", "ns", "j-actor-0") is True
        assert await api.delete("v1", "Pod", "ns", "j-actor-0") is False
        fake.replies.append((500, {"message": "etcd is sad"}))
        with pytest.raises(ApiError, match="HTTP 500.*etcd is sad") as err:
            await api.create(POD)
        assert err.value.status == 500
    finally:
        await api.close()
    patch = fake.seen[0]
    assert patch["method"] == "PATCH" and patch["path"] == "/apis/rlhf.dev/v1alpha1/namespaces/ns/rlhfjobs/j/status"
    assert patch["headers"]["Content-Type"] == "application/merge-patch+json"
    assert patch["body"] == {"status": {"phase": "Running"}}
    delete = fake.seen[3]
    assert delete["method"] == "DELETE" and delete["body"]["propagationPolicy"] == "Background"


async def test_server_certificate_from_another_ca_is_refused(pki, https_server):
    fake, host = https_server
    api = KubeApi(config=client_config(pki, host, ca="other-ca"))
    try:
        with pytest.raises(ApiError) as err:
            await api.create(POD)
    finally:
        await api.close()
    assert err.value.status == 0 and "certificate" in str(err.value).lower()
    assert fake.seen == []


async def test_unreachable_server_is_a_retryable_api_error():
    port = free_port()  # reserved, so nobody listens on it
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{port}"
    api = KubeApi(config=config, timeout=2.0)
    try:
        with pytest.raises(ApiError) as err:
            await api.create(POD)
    finally:
        await api.close()
    assert err.value.status == 0 and "POST /api/v1/namespaces/ns/pods" in str(err.value)


async def test_token_is_refreshed_and_never_sent_to_trainer_pods(pki, https_server, monkeypatch):
    fake, host = https_server
    config = client_config(pki, host)
    tokens = iter(["token-2", "token-3", "token-4"])

    def refresh(cfg: kubernetes.client.Configuration) -> None:  # as load_incluster_config's hook does
        cfg.api_key["authorization"] = next(tokens)

    config.refresh_api_key_hook = refresh
    assert auth_headers(config) == {"authorization": "Bearer token-2"}

    plain = FakeApiServer()  # a trainer's /metrics over plain HTTP
    app = aiohttp.web.Application()
    app.router.add_route("GET", "/metrics", plain.handle)
    plain.replies.append((200, {"step": 3}))
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    api = KubeApi(config=config)
    try:
        assert await api.create(POD) is True
        assert await api.create(POD) is True  # within AUTH_RECHECK_SECONDS: the same token
        monkeypatch.setattr(executor, "AUTH_RECHECK_SECONDS", -1.0)
        assert await api.create(POD) is True  # re-read: the hook's next token
        assert json.loads(await api.fetch_text(f"http://127.0.0.1:{port}/metrics")) == {"step": 3}
        assert await api.fetch_text(f"http://127.0.0.1:{port}/nothing") is None  # 404: no progress, no error
    finally:
        await api.close()
        await runner.cleanup()
    assert [s["headers"]["Authorization"] for s in fake.seen] == ["Bearer token-3", "Bearer token-3", "Bearer token-4"]
    assert "Authorization" not in plain.seen[0]["headers"]


async def test_retry_after_and_fresh_lists(pki, https_server):
    fake, host = https_server
    api = KubeApi(config=client_config(pki, host))
    throttled = {"kind": "Status", "status": "Failure", "reason": "TooManyRequests", "code": 429,
                 "message": "too many requests, please try again later"}
    pods = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
            "items": [{"metadata": {"name": "j-actor-0", "uid": "u1"}}]}
    fake.replies += [(429, throttled, {"Retry-After": "3"}), (503, {}), (200, pods), (404, {})]
    try:
        with pytest.raises(ApiError) as err:
            await api.create(POD)
        assert (err.value.status, err.value.retry_after) == (429, 3.0)
        with pytest.raises(ApiError) as err:
            await api.create(POD)
        assert (err.value.status, err.value.retry_after) == (503, None)
        listed = await api.list_objects("v1", "Pod", "ns", "rlhf.dev/job")
        assert listed == [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j-actor-0", "uid": "u1"}}]
        # A kind whose CRD is not installed: nothing to compare against, not an error.
        assert await api.list_objects("scheduling.volcano.sh/v1beta1", "PodGroup", "ns", "rlhf.dev/job") is None
    finally:
        await api.close()
    lists = fake.seen[2:]
    assert [(s["method"], s["path"], s["query"]) for s in lists] == [
        ("GET", "/api/v1/namespaces/ns/pods", {"labelSelector": "rlhf.dev/job"}),
        ("GET", "/apis/scheduling.volcano.sh/v1beta1/namespaces/ns/podgroups", {"labelSelector": "rlhf.dev/job"})]
