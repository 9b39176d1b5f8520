"""A fault-injecting HTTP proxy between an operator and the test control plane's API server.

    proxy = faultproxy.start(cp)                         # 127.0.0.1 only, plain HTTP in, TLS to the API
    kubeconfig = proxy.kubeconfig(release.kubeconfig, tmp / "faulty.kubeconfig")   # same token, via the proxy
    proxy.fail("PATCH", r"/rlhfjobs/j1/status$", status=409, times=3)   # the next 3 matching requests
    proxy.fail("PATCH", r"/rlhfjobs/j2/status$", status=429, times=1, retry_after=2)
    proxy.fail(("POST", "PATCH", "DELETE"), r"/namespaces/rlhf-it/", status=500, share=0.3)
    proxy.pause_watches()        # cut every watch stream; re-watches wait ...
    proxy.resume_watches(gone=True)   # ... and are answered 410 Gone: the client must list again
    proxy.requests("PATCH", r"/rlhfjobs/j1/status$")   # what the proxy saw: (time, method, path, status, injected)
    proxy.stop()

An injected failure is answered by the proxy itself (the request never reaches the API server), with a
metav1.Status body as the API server writes it, so that the operator cannot tell the two apart. A
re-watch answered "410 Gone" gets what the API server sends for a resourceVersion it no longer holds: HTTP
200 and one ERROR watch event carrying a Status of code 410 (reason Expired).

Bounded: it listens on loopback only, keeps the last MAX_RECORDS requests, and runs on one event loop in
a daemon thread of the test process (stopped by stop() or with the process).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.controlplane.cluster import ControlPlane

MAX_RECORDS = 100_000
# Request headers passed on to the API server, and answer headers passed back (no hop-by-hop headers,
# no encodings: the proxy's client decodes what it reads).
FORWARDED_REQUEST = ("Authorization", "Content-Type", "Accept", "User-Agent")
FORWARDED_ANSWER = ("Content-Type", "Retry-After", "Warning", "Audit-Id")
REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}


@dataclass(frozen=True)
class Record:
    """One request the proxy answered: when (time.monotonic()), what, with which status, injected or not."""

    at: float
    method: str
    path: str  # without the query
    query: str
    status: int
    injected: bool
    name: str = ""  # metadata.name of the object a POST sent (a create names it in its body, not its path)


@dataclass
class Fault:
    """Answer matching requests with `status` instead of forwarding them: the next `times` of them, or a
    `share` of them (drawn from the proxy's seeded generator)."""

    methods: frozenset[str]
    pattern: re.Pattern[str]
    status: int
    times: int | None = None
    share: float = 0.0
    retry_after: int | None = None
    injected: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and bool(self.pattern.search(path))


def status_body(code: int, message: str, reason: str) -> dict[str, Any]:
    """A metav1.Status as the API server answers a failed request."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def posted_name(body: bytes | None) -> str:
    """metadata.name (else generateName) of a JSON object body; "" for anything else."""
    try:
        meta = json.loads(body or b"").get("metadata") or {}
    except (ValueError, AttributeError):
        return ""
    return str(meta.get("name") or meta.get("generateName") or "")


def is_watch(query: dict[str, str]) -> bool:
    return query.get("watch", "").lower() in ("true", "1")


class FaultProxy:
    """The proxy; use start() to get a running one."""

    def __init__(self, upstream: str, ssl_context: Any, seed: int = 0):
        self.upstream = upstream.rstrip("/")
        self._ssl = ssl_context
        self._random = random.Random(seed)
        self._faults: list[Fault] = []
        self._records: deque[Record] = deque(maxlen=MAX_RECORDS)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._watches: dict[web.StreamResponse, aiohttp.ClientResponse] = {}  # open streams -> their upstream
        self._paused: asyncio.Event | None = None  # set = watches flow
        self._gone_while_paused = False
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- control, from the test's thread ----------------------------------------------------------
    def fail(self, methods: str | Iterable[str], pattern: str, status: int, *, times: int | None = None,
             share: float = 0.0, retry_after: int | None = None) -> Fault:
        """Answer matching requests (method in `methods`, `pattern` searched in the path) with `status`."""
        if times is None and not 0 < share <= 1:
            raise ValueError(f"give times= or a share in (0, 1], got times={times} share={share}")
        names = frozenset([methods] if isinstance(methods, str) else methods)
        fault = Fault(names, re.compile(pattern), status, times, share, retry_after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests(self, method: str = "", pattern: str = "") -> list[Record]:
        """The requests seen so far (oldest first), filtered by method and a pattern searched in the path."""
        regex = re.compile(pattern)
        with self._lock:
            return [r for r in self._records if (not method or r.method == method) and regex.search(r.path)]

    def pause_watches(self) -> None:
        """Cut every open watch stream; watch requests made from now on wait for resume_watches()."""
        asyncio.run_coroutine_threadsafe(self._pause(), self._loop).result(10)

    def resume_watches(self, gone: bool = False) -> None:
        """Let watches flow again; gone=True answers each re-watch held meanwhile with 410 Gone."""
        asyncio.run_coroutine_threadsafe(self._resume(gone), self._loop).result(10)

    def kubeconfig(self, source: Path, dest: Path) -> Path:
        """`source` (a kubeconfig with a token) pointing at the proxy instead of the API server."""
        config = yaml.safe_load(source.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"] = {"server": self.url}
        dest.write_text(yaml.safe_dump(config, sort_keys=False))
        return dest

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- the server, on the proxy's loop ------------------------------------------------------------
    async def _start(self) -> None:
        self._paused = asyncio.Event()
        self._paused.set()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl, limit=256))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def _shutdown(self) -> None:
        await self._cut_watches()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _pause(self) -> None:
        assert self._paused is not None
        self._paused.clear()
        self._gone_while_paused = False
        await self._cut_watches()

    async def _resume(self, gone: bool) -> None:
        assert self._paused is not None
        self._gone_while_paused = gone
        self._paused.set()

    async def _cut_watches(self) -> None:
        """Close each open watch stream on both sides, as a broken connection would."""
        for response, answer in list(self._watches.items()):
            request = response._req  # type: ignore[attr-defined]
            if request is not None and request.transport is not None:
                request.transport.close()
            answer.close()
        self._watches.clear()

    def _record(self, request: web.Request, status: int, injected: bool, body: bytes | None = None) -> None:
        with self._lock:
            self._records.append(Record(time.monotonic(), request.method, request.path, request.query_string,
                                        status, injected, posted_name(body) if request.method == "POST" else ""))

    def _injected(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault.matches(method, path):
                    continue
                if fault.times is not None:
                    if fault.injected < fault.times:
                        fault.injected += 1
                        return fault
                elif self._random.random() < fault.share:
                    fault.injected += 1
                    return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._injected(request.method, request.path)
        if fault is not None:
            self._record(request, fault.status, True, await request.read() if request.can_read_body else None)
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            reason = REASONS.get(fault.status, "InternalError")
            return web.json_response(status_body(fault.status, f"injected by the fault proxy: {reason}", reason),
                                     status=fault.status, headers=headers)
        if is_watch(dict(request.query)):
            return await self._watch(request)
        return await self._forward(request)

    def _upstream_request(self, request: web.Request, body: bytes | None):
        headers = {k: request.headers[k] for k in FORWARDED_REQUEST if k in request.headers}
        assert self._session is not None
        return self._session.request(request.method, self.upstream + request.path_qs, data=body, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read() if request.can_read_body else None
        try:
            async with self._upstream_request(request, body) as answer:
                data = await answer.read()
                headers = {k: answer.headers[k] for k in FORWARDED_ANSWER if k in answer.headers}
                status = answer.status
        except aiohttp.ClientError as err:
            self._record(request, 502, False, body)
            return web.json_response(status_body(502, str(err), "BadGateway"), status=502)
        self._record(request, status, False, body)
        return web.Response(body=data, status=status, headers=headers)

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        assert self._paused is not None
        if not self._paused.is_set():
            await self._paused.wait()
            if self._gone_while_paused and "resourceVersion" in request.query:
                self._record(request, 410, True)
                response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                await response.prepare(request)
                expired = status_body(410, "too old resource version (the fault proxy held this watch)", "Expired")
                await response.write(json.dumps({"type": "ERROR", "object": expired}).encode() + b"\n")
                await response.write_eof()
                return response
        try:
            async with self._upstream_request(request, None) as answer:
                headers = {k: answer.headers[k] for k in FORWARDED_ANSWER if k in answer.headers}
                response = web.StreamResponse(status=answer.status, headers=headers)
                await response.prepare(request)
                self._record(request, answer.status, False)
                self._watches[response] = answer
                try:
                    async for chunk in answer.content.iter_any():
                        await response.write(chunk)
                except (ConnectionResetError, aiohttp.ClientError, RuntimeError):
                    pass  # cut by pause_watches(), or the client went
                finally:
                    self._watches.pop(response, None)
                return response
        except aiohttp.ClientError as err:
            self._record(request, 502, False)
            return web.json_response(status_body(502, str(err), "BadGateway"), status=502)


def start(cp: ControlPlane, seed: int = 0) -> FaultProxy:
    """A running proxy in front of the control plane's API server (it trusts the cluster's CA)."""
    import ssl

    proxy = FaultProxy(cp.url, ssl.create_default_context(cafile=str(cp.pki.ca_cert)), seed=seed)
    proxy._thread.start()
    asyncio.run_coroutine_threadsafe(proxy._start(), proxy._loop).result(30)
    return proxy
