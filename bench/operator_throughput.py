"""Operator throughput: time from applying RLHFJobs to all their pods existing, against a bare loop.

    .venv/bin/python bench/operator_throughput.py [--repeats 3] [--write]

Two scenarios:
  one-big:    1 job of 64 pods (sft, actor replicas 64)
  many-small: 200 jobs of 4 pods (grpo, actor replicas 3 + reference)
Both run against one real kube-apiserver + etcd (tests/controlplane, started for the benchmark without
a scheduler, so pods stay unscheduled and nothing else writes to them), with the chart installed by
helm; every run gets a fresh namespace (Pod Security restricted, deleted after the run).
Operator: a fresh `rlhf-operator operator` subprocess with the chart's args, as the chart's
ServiceAccount; the RLHFJobs are POSTed in a loop by the admin; the clock stops when a watch has seen
every pod ADDED.
Bare: the same pods (built by the same builders, minus the job label so no operator would claim them)
POSTed one by one with the kubernetes client (no model deserialisation), as the same ServiceAccount
(same API priority level), with no operator running, timed the same way. Bare and operator alternate in each repeat (which one
goes first alternates too); medians are reported. ratio = bare / operator (1.0 = as fast as a client
that does nothing but create the pods; goal >= 0.7). Operator RSS is read from /proc after the run.
--write replaces the "Operator throughput" section of bench/RESULTS.md.

What bounds the ratio here: the operator's run sends ~2.5 requests per pod in many-small (the job
itself, its Service, ConfigMap, PVC and Event, one status write, besides the pods) while the bare loop
sends one, and on 2 cores the operator, kube-apiserver and etcd compete for CPU. The CPU seconds of
kube-apiserver + etcd and of the operator are reported for that.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results_md import write_section  # noqa: E402

from tests.controlplane import cluster, kube  # noqa: E402
from tests.controlplane.fixtures import TRAINER_SA, Release, install_release  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Operator throughput"


def manifest(example: str, name: str, namespace: str, replicas: dict[str, int]) -> dict:
    obj = yaml.safe_load((REPO / "crds" / "examples" / example).read_text())
    obj["metadata"] = {"name": name, "namespace": namespace}
    for role in obj["spec"]["roles"]:
        role["replicas"] = replicas.get(role["name"], role.get("replicas", 1))
    hyper = obj["spec"]["hyperparameters"]  # every actor rank takes an equal share of the batch
    hyper["batchSize"] = replicas.get("actor", 1) * hyper.get("microBatchSize", 1)
    obj["spec"]["scheduling"] = {"gangScheduler": "none"}
    return obj


SCENARIOS = {
    "one-big (1 job x 64 pods)": lambda ns: [manifest("sft-tiny.yaml", "big", ns, {"actor": 64})],
    "many-small (200 jobs x 4 pods)": lambda ns: [manifest("grpo-tiny.yaml", f"small-{i:03d}", ns, {"actor": 3})
                                                  for i in range(200)],
}


def pods_of(jobs: list[dict]) -> list[dict]:
    """The pods the operator will create for these jobs (same builders), for the bare loop."""
    from rlhf_contract import wire
    from rlhf_operator import api, builders

    pods = []
    for obj in jobs:
        job = api.parse_job({**obj, "metadata": {**obj["metadata"], "uid": "bare"}})
        for pod in builders.build_gang(job, 0, builders.BuildSettings()):
            pod = copy.deepcopy(pod)
            pod["metadata"].pop("ownerReferences", None)
            pod["metadata"]["name"] = "bare-" + pod["metadata"]["name"]
            # Same labels, but not the job label: the operator must not take these pods for its own.
            pod["metadata"]["labels"]["bench/job"] = pod["metadata"]["labels"].pop(wire.LABEL_JOB)
            pods.append(pod)
    return pods


class PodCounter:
    """A raw watch on a namespace's pods in a thread: `wait(n)` returns when n pods were ADDED."""

    def __init__(self, cp: cluster.ControlPlane, namespace: str):
        self.count = 0
        self.last_added = 0.0
        self._done = threading.Condition()
        address = urllib.parse.urlsplit(cp.url)
        connection = http.client.HTTPSConnection(address.hostname, address.port, context=cp.ssl_context())
        connection.connect()
        self._socket = connection.sock  # shut down by wait(): that ends the reader's blocking read
        connection.request("GET", f"/api/v1/namespaces/{namespace}/pods?watch=true")
        self._response = connection.getresponse()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self._response:
                line = line.strip()
                if line and json.loads(line).get("type") == "ADDED":
                    with self._done:
                        self.count += 1
                        self.last_added = time.perf_counter()
                        self._done.notify_all()
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            pass  # wait() closed the watch (a chunk cut short is an IncompleteRead)

    def wait(self, n: int, timeout: float = 600) -> float:
        """The clock time of the n-th ADDED event; closes the watch."""
        try:
            with self._done:
                if not self._done.wait_for(lambda: self.count >= n, timeout):
                    raise TimeoutError(f"only {self.count} of {n} pods after {timeout}s")
                return self.last_added
        finally:
            self._socket.shutdown(socket.SHUT_RDWR)


def run_operator(cp: cluster.ControlPlane, client, jobs: list[dict], n_pods: int) -> tuple[float, float]:
    """(seconds until every pod was seen, seconds until the last job POST returned)."""
    from kubernetes.client import CustomObjectsApi

    namespace = jobs[0]["metadata"]["namespace"]
    counter = PodCounter(cp, namespace)
    custom = CustomObjectsApi(client)
    start = time.perf_counter()
    for obj in jobs:
        custom.create_namespaced_custom_object("rlhf.dev", "v1alpha1", namespace, "rlhfjobs", obj,
                                               _preload_content=False)
    posted = time.perf_counter() - start
    return counter.wait(n_pods) - start, posted


def run_bare(cp: cluster.ControlPlane, client, pods: list[dict], namespace: str) -> float:
    from kubernetes.client import CoreV1Api

    counter = PodCounter(cp, namespace)
    core = CoreV1Api(client)
    start = time.perf_counter()
    for pod in pods:
        core.create_namespaced_pod(namespace, {**pod, "metadata": {**pod["metadata"], "namespace": namespace}},
                                   _preload_content=False)
    return counter.wait(len(pods)) - start


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(cp: cluster.ControlPlane) -> float:
    """CPU seconds kube-apiserver and etcd have used so far."""
    return sum(cpu_seconds(cp.processes[name].pid) for name in ("kube-apiserver", "etcd"))


def api_client(kubeconfig: Path):
    import kubernetes

    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=config)
    return kubernetes.client.ApiClient(config)


def one_round(cp: cluster.ControlPlane, release: Release, scenario: str, which: str, workdir: Path, tag: str) -> dict:
    """One timed run in a fresh namespace: the bare loop alone, or a fresh operator and its jobs.
    The bare loop runs with no operator beside it: the operator's watches and CPU are its own cost."""
    namespace = f"{which}-{tag}"
    kube.create_namespace(cp, namespace, service_accounts=[TRAINER_SA])
    op = release.operator(cp, workdir / "operator.log") if which == "operator" else None
    try:
        bare_pods = pods_of(SCENARIOS[scenario](namespace))
        before = server_cpu(cp)
        if op is None:
            seconds = run_bare(cp, api_client(release.kubeconfig), bare_pods, namespace)
            return {"bare": seconds, "bare_server_cpu": server_cpu(cp) - before}
        op_cpu = cpu_seconds(op.process.pid)
        seconds, posted = run_operator(cp, api_client(cp.kubeconfig), SCENARIOS[scenario](namespace), len(bare_pods))
        rss, peak_rss = rss_mib(op.process.pid)
        return {"operator": seconds, "posted": posted, "rss": rss, "peak_rss": peak_rss,
                "op_server_cpu": server_cpu(cp) - before, "op_cpu": cpu_seconds(op.process.pid) - op_cpu}
    finally:
        if op is not None:
            op.stop()
        kube.delete_namespace(cp, namespace, timeout=600)


NOTES = [
    "What the numbers mean: kube-apiserver, etcd, the operator and the client share the 2 cores. The bare",
    "loop sends one request per pod. The operator's run also carries the jobs' own POSTs (validated",
    "against the CRD's schema and CEL rules) and, per job, a Service, ConfigMap, PVC and Event and one",
    "status write: about 10 requests per job of 4 pods in many-small. Pods are admitted (Pod Security",
    "restricted, ServiceAccount, ...) the same way in both runs. Other work on the machine inflates single",
    "repeats (see the per-repeat times); the CPU seconds are less sensitive to it than the wall times.",
]


def repeat_line(scenario: str, runs: list[dict]) -> str:
    """The per-repeat figures of one scenario, for reading the medians against the noise."""
    jobs = len(SCENARIOS[scenario]("x"))
    times = ", ".join(f"{x['bare']:.2f} / {x['operator']:.2f} s" for x in runs)
    posted = ", ".join(f"{x['posted']:.2f}" for x in runs)
    server = ", ".join(f"{x['op_server_cpu'] / x['bare_server_cpu']:.1f}x" for x in runs)
    per_job = statistics.median(x["op_cpu"] for x in runs) * 1000 / jobs
    return (f"- {scenario}: bare / operator per repeat: {times}; the last job POST returned at: {posted} s; "
            f"kube-apiserver + etcd CPU, operator run / bare run: {server}; operator CPU per job (median): "
            f"{per_job:.0f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    rows, repeats = [], []
    with tempfile.TemporaryDirectory(prefix="bench-op-") as tmp:
        cp = cluster.start(Path(tmp) / "controlplane", scheduler=False)
        try:
            release = install_release(cp, Path(tmp))
            for s, scenario in enumerate(SCENARIOS):
                runs = []
                for r in range(args.repeats):
                    run: dict = {}
                    for which in (["bare", "operator"] if r % 2 == 0 else ["operator", "bare"]):
                        run.update(one_round(cp, release, scenario, which, Path(tmp), f"s{s}r{r}"))
                    runs.append(run)
                    last = runs[-1]
                    print(f"{scenario} #{r + 1}: bare {last['bare']:.2f}s operator {last['operator']:.2f}s "
                          f"ratio {last['bare'] / last['operator']:.2f} rss {last['rss']:.0f} MiB; CPU s: "
                          f"apiserver+etcd {last['bare_server_cpu']:.2f} (bare) {last['op_server_cpu']:.2f} "
                          f"(operator run), operator {last['op_cpu']:.2f}", flush=True)
                bare = statistics.median(x["bare"] for x in runs)
                oper = statistics.median(x["operator"] for x in runs)
                ratios = [x["bare"] / x["operator"] for x in runs]
                repeats.append(repeat_line(scenario, runs))
                rows.append((scenario, bare, oper, statistics.median(ratios), min(ratios), max(ratios),
                             max(x["peak_rss"] for x in runs),
                             *(statistics.median(x[k] for x in runs)
                               for k in ("bare_server_cpu", "op_server_cpu", "op_cpu"))))
        finally:
            cluster.stop(cp)
    table = ["| scenario | bare loop (median) | operator (median) | ratio bare/operator (median, min-max) "
             "| operator peak RSS | CPU s (median): apiserver+etcd bare / apiserver+etcd operator run / operator |",
             "|---|---|---|---|---|---|"]
    for scenario, bare, oper, ratio, lo, hi, rss, bare_server, op_server, op_cpu in rows:
        table.append(f"| {scenario} | {bare:.2f} s | {oper:.2f} s | {ratio:.2f} ({lo:.2f}-{hi:.2f}) | {rss:.0f} MiB "
                     f"| {bare_server:.2f} / {op_server:.2f} / {op_cpu:.2f} |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    text = "\n".join([
        SECTION, "",
        "Time from POSTing the RLHFJobs to a watch having seen every pod ADDED, against a bare loop",
        "creating the same pods with the same client on the same kube-apiserver (goal: ratio >= 0.7).",
        "", f"Command: `.venv/bin/python bench/operator_throughput.py --repeats {args.repeats} --write`",
        f"Machine: {machine} (shared with other work: noisy). Server: kube-apiserver {cluster.K8S_VERSION} +",
        "etcd from tests/controlplane (no scheduler), one for all runs, a fresh namespace per run, a fresh",
        "operator per operator run (the chart's args and ServiceAccount); bare and operator alternate.",
        "Operator RSS: peak resident memory of the operator process (kopf, the jobs and its indexes of",
        "their children, the API session).", "",
        *table, "", *repeats, "", *NOTES, ""])
    print("\n" + text)
    if args.write:
        write_section(RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
