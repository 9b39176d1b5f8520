"""CPU per API request of the operator's client (kube/executor.py KubeApi: aiohttp in the event loop)
against the official kubernetes client on a thread pool (what the operator used before).

    .venv/bin/python bench/api_client_cost.py [--requests 1000] [--repeats 5] [--write]

Each run POSTs `--requests` ConfigMaps (2 KB of data each, about a pod's size) at 32 at a time to the
test control plane's kube-apiserver (tests/controlplane, over TLS with a client certificate, a fresh
namespace per run) and reads this process's CPU time (user + system) around the requests: the
client's cost, not the API server's. The two clients alternate within each repeat (which
goes first alternates too); medians are reported. --write replaces the "API client cost" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_md import write_section  # noqa: E402

from tests.controlplane import cluster, kube  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## API client cost"
CONCURRENCY = 32


def config_map(i: int, namespace: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": namespace,
                                                                  "labels": {"rlhf.dev/job": "bench"}},
            "data": {"config.json": "x" * 2000}}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def post_all(send, n: int, namespace: str) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            await send(config_map(i, namespace))

    await asyncio.gather(*(one(i) for i in range(n)))


async def with_aiohttp(n: int, namespace: str) -> tuple[float, float]:
    """The operator's KubeApi: raw JSON on one aiohttp session in the event loop."""
    from rlhf_operator.kube.executor import KubeApi

    api = KubeApi.connect(CONCURRENCY)
    try:
        await api.create(config_map(-1, namespace))  # open the session outside the measurement
        wall, cpu = time.perf_counter(), cpu_seconds()
        await post_all(api.create, n, namespace)
        return time.perf_counter() - wall, cpu_seconds() - cpu
    finally:
        await api.close()


async def with_thread_pool(n: int, namespace: str) -> tuple[float, float]:
    """The official client's raw call_api (no model (de)serialisation) on a thread pool, as before."""
    import kubernetes
    from rlhf_operator.kube.executor import load_client_config

    config = load_client_config()
    config.connection_pool_maxsize = CONCURRENCY
    client = kubernetes.client.ApiClient(config)
    pool = ThreadPoolExecutor(CONCURRENCY)
    path = f"/api/v1/namespaces/{namespace}/configmaps"

    def post(body: dict) -> int:
        params = client.param_serialize("POST", path, body=body, auth_settings=["BearerToken"],
                                        header_params={"Content-Type": "application/json", "Accept": "application/json"})
        response = client.call_api(*params, _request_timeout=10)
        response.read()
        return response.status

    async def send(body: dict) -> None:
        status = await asyncio.get_running_loop().run_in_executor(pool, post, body)
        if status >= 300:
            raise RuntimeError(f"POST {path}: HTTP {status}")

    try:
        await send(config_map(-1, namespace))
        wall, cpu = time.perf_counter(), cpu_seconds()
        await post_all(send, n, namespace)
        return time.perf_counter() - wall, cpu_seconds() - cpu
    finally:
        pool.shutdown()
        client.close()


CLIENTS = {"aiohttp (KubeApi)": with_aiohttp, "official client on a thread pool": with_thread_pool}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        cp = cluster.start(Path(tmp), scheduler=False)
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        try:
            for r in range(args.repeats):
                order = list(CLIENTS) if r % 2 == 0 else list(reversed(CLIENTS))
                for name in order:
                    namespace = f"r{r}-{'a' if name.startswith('aiohttp') else 't'}"
                    kube.create_namespace(cp, namespace)
                    wall, cpu = asyncio.run(CLIENTS[name](args.requests, namespace))
                    runs[name].append((wall, cpu))
                    print(f"#{r + 1} {name}: {wall:.2f} s, client CPU {cpu * 1000 / args.requests:.3f} ms/request",
                          flush=True)
                    kube.delete_namespace(cp, namespace)
        finally:
            cluster.stop(cp)
    rows = ["| client | wall (median) | client CPU per request (median, min-max) |", "|---|---|---|"]
    cpu_median = {}
    for name, values in runs.items():
        per_request = [cpu * 1000 / args.requests for _, cpu in values]
        cpu_median[name] = statistics.median(per_request)
        rows.append(f"| {name} | {statistics.median(w for w, _ in values):.2f} s | {cpu_median[name]:.3f} ms "
                    f"({min(per_request):.3f}-{max(per_request):.3f}) |")
    ratio = cpu_median["official client on a thread pool"] / cpu_median["aiohttp (KubeApi)"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    text = "\n".join([
        SECTION, "",
        f"CPU of the client process per POST ({args.requests} ConfigMaps of 2 KB, {CONCURRENCY} in flight, one",
        "kube-apiserver (tests/controlplane, TLS) for all runs, clients interleaved): what each API write",
        "costs the operator besides kopf.",
        "", f"Command: `.venv/bin/python bench/api_client_cost.py --requests {args.requests} "
            f"--repeats {args.repeats} --write`",
        f"Machine: {machine}.", "", *rows, "",
        f"The thread-pool client costs {ratio:.1f}x the CPU of the aiohttp one per request (medians). The",
        "operator's API writes moved to aiohttp for this; see \"Operator throughput\" for what it did there.", ""])
    print("\n" + text)
    if args.write:
        write_section(RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
