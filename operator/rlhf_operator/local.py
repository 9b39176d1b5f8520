"""`rlhf-operator run-local MANIFEST`: run the RLHFJobs of a file on this machine, no cluster (the
embedded default).

The same builders and planner as the kopf operator decide everything; this module only plays the
API server and the kubelet for them:

    manifest --api.parse_job--> Job
    loop:  pods' processes --pod_status--> pod dicts --planner.observe_pod--> Observed
           planner.plan(job, observed, now) -> actions + status
           CreateObject(Pod)  -> start `python -m rlhf_trainer` as a process group (localexec), with
                                 the pod's nvidia.com/gpu as CUDA_VISIBLE_DEVICES on a GPU machine
           CreateObject(ConfigMap / PVC / ...) -> local files and folders under runs/<job>/
           DeletePods          -> SIGTERM, grace, SIGKILL the process groups
           wait for a process exit, the planner's requeue_after, or the next progress refresh
    until status.phase is Succeeded or Failed.

runs/<job>/ holds config/config.json (the ConfigMap), checkpoints/ (the volume: step-N/,
metrics/, export/), pods/<pod>/log.txt, events.log, status.json and report.png.
Several jobs in one file (multi-document YAML) run side by side (LocalRun): every pass hands each job
the others' status as peers, so a job naming another in `fromJob` waits for it through the planner,
as in a cluster, and its pods see the source's runs/<source>/checkpoints/export at /sources/<source>.
Suspend like `kubectl patch --type=merge -p '{"spec":{"suspend":true}}'`: create runs/<job>/SUSPEND;
remove it to resume. `--suspend-after-step N` does both once (a test hook).
Running the same manifest again (without --fresh) resumes from runs/<job>/checkpoints, as a job
recreated on a retained checkpoint volume does. Ctrl-C or SIGTERM stops every process group.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import shlex
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from rlhf_contract import wire

from rlhf_operator import api, builders, chain, constants, localexec, planner, report
from rlhf_operator.progress import format_sample, merge_progress

LOCAL_IP = "127.0.0.1"
# How often progress bars and status.progress refresh while nothing else wakes the loop.
REFRESH_SECONDS = 0.5


class LocalRunError(RuntimeError):
    """The manifest cannot run locally (unreadable, not one RLHFJob, invalid spec)."""


def load_manifests(path: Path) -> list[dict[str, Any]]:
    """Every RLHFJob document of a YAML file (other kinds are skipped), at least one, names unique;
    errors name the file."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as e:
        raise LocalRunError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LocalRunError(f"{path}: not YAML: {e}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == constants.KIND]
    if not jobs:
        raise LocalRunError(f"{path}: expected at least one {constants.KIND} document, found none")
    for i, job in enumerate(jobs):
        if job.get("apiVersion") != constants.API_VERSION:
            raise LocalRunError(f"{path}: {constants.KIND} {i + 1}: apiVersion must be {constants.API_VERSION}")
    names = [str((job.get("metadata") or {}).get("name", "")) for job in jobs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LocalRunError(f"{path}: more than one {constants.KIND} named {', '.join(repeated)}")
    return jobs


def missing_sources(jobs: list[api.Job]) -> list[str]:
    """`fromJob` names that no job of the run holds: locally nothing else could ever provide them."""
    names = {job.name for job in jobs}
    return [f"{job.name}: spec.{key}.fromJob names RLHFJob {source.from_job}, which is not in this file"
            for job in jobs for key, source in job.spec.model_sources()
            if source.from_job and source.from_job not in names]


def unsupported_sources(jobs: list[api.Job]) -> list[str]:
    """pvc:// sources: run-local has no claims but the jobs' own checkpoint folders, so it refuses them up
    front, naming the field. (hf:// and s3:// work: each pod runs its source initializer first.)"""
    return [f"{job.name}: spec.{key}: pvc:// sources need a cluster; run-local reads paths on this machine: "
            "name the folder instead"
            for job in jobs for key, ref, _ in job.spec.source_fields() if ref.kind == "pvc"]


# Manifest fields that name files: run-local reads a relative one against the manifest's folder.
LOCAL_PATH_FIELDS = (("model", "path"), ("rewardModel", "path"), ("dataset", "path"), ("dataset", "evalPath"))


def gpu_shortages(jobs: list[api.Job], visible: int) -> list[str]:
    """Jobs whose pods together ask for more GPUs than the machine's `visible` ones (localexec.visible_gpus).
    A machine with none runs every job on its CPUs, whatever the roles' gpus (cpu_fallback_notes says so)."""
    problems = []
    for job in jobs:
        pods = [(r.name, r.replicas, r.gpus) for r in job.spec.pod_roles() if r.gpus]
        asked = sum(replicas * gpus for _, replicas, gpus in pods)
        if visible and asked > visible:
            parts = ", ".join(f"{name} {replicas} x {gpus}" for name, replicas, gpus in pods)
            problems.append(f"{job.name}: its pods ask for {asked} GPUs ({parts}; roles[].replicas x roles[].gpus) "
                            f"but this machine shows {visible} (CUDA_VISIBLE_DEVICES or nvidia-smi): lower them, "
                            f"or colocate roles (colocateWith)")
    return problems


def cpu_fallback_notes(jobs: list[api.Job], visible: int) -> list[str]:
    """On a machine with no GPU (`visible` 0), one line per job whose roles ask for GPUs: it runs on the
    CPUs (gloo) instead, which the user should hear about rather than find in DeepSpeed's log."""
    if visible:
        return []
    notes = []
    for job in jobs:
        asking = [f"{r.name} {r.gpus}" for r in job.spec.pod_roles() if r.gpus]
        if asking:
            notes.append(f"{job.name}: its roles ask for GPUs ({', '.join(asking)}; roles[].gpus) but this machine "
                         f"shows none (CUDA_VISIBLE_DEVICES or nvidia-smi): running every rank on the CPUs (gloo)")
    return notes


def resolve_local_paths(obj: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of the manifest with relative model / dataset paths made absolute against `base`.

    In a cluster these are paths inside the container (absolute); locally each pod runs in its own
    folder, so `dataset: {path: pairs.jsonl}` next to the manifest would not be found. Values with a
    scheme (`tiny://`, `synthetic://`) and absolute paths are kept as they are.
    """
    spec = dict(obj.get("spec") or {})
    for section, key in LOCAL_PATH_FIELDS:
        part = spec.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            spec[section] = {**part, key: str((base / value).resolve())}
    return {**obj, "spec": spec}


def stamp_new_object(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    """What the API server adds on create: uid, creationTimestamp, namespace, generation."""
    meta = dict(obj.get("metadata", {}))
    meta.setdefault("namespace", namespace)
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("creationTimestamp", localexec.utc_now())
    meta.setdefault("generation", 1)
    return {**obj, "metadata": meta}


def progress_from_row(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """status.progress fields from the actor's last metrics line (the local stand-in for /metrics)."""
    if not row:
        return {}
    fields = {"step": ("step", int), "rewardMean": ("reward_mean", float), "kl": ("kl", float),
              "lastCheckpointStep": ("last_checkpoint_step", int)}
    progress = {key: kind(row[name]) for key, (name, kind) in fields.items()
                if isinstance(row.get(name), int | float) and row[name] == row[name]}
    if isinstance(row.get("alarms"), dict):  # rlhf_trainer.alarms: reason -> message, maybe none firing
        progress["alarms"] = dict(row["alarms"])
    if isinstance(row.get("trackers"), dict) and row["trackers"]:  # rlhf_trainer.trackers: tracker -> link
        progress["trackers"] = dict(row["trackers"])
    return progress


def last_json_line(path: Path, tail_bytes: int = 8192) -> dict[str, Any] | None:
    """The last complete JSON object of a JSONL file (reads only its tail), None if none yet."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # torn line of a process killed mid-write, or a cut-off first line
        if isinstance(row, dict):
            return row
    return None


def volume_dir(run_dir: Path, pod_dir: Path, mount_path: str, volume: Mapping[str, Any],
               claims: Mapping[str, Path] | None = None) -> Path:
    """Local folder standing in for a pod volume: the config, a checkpoint volume, scratch.

    claims: claim name -> folder of every job's checkpoint volume in the run (a `fromJob` source's
    claim is another job's); None: every claim is this job's own volume (one job alone).
    """
    if "configMap" in volume:
        return run_dir / "config"
    if "persistentVolumeClaim" in volume and claims is not None:
        claim = volume["persistentVolumeClaim"]["claimName"]
        if claim not in claims:
            raise LocalRunError(f"volume {volume['name']}: claim {claim} is not the checkpoint volume of a job "
                                f"of this run ({', '.join(sorted(claims))})")
        return claims[claim]
    if mount_path == wire.CHECKPOINT_MOUNT or "persistentVolumeClaim" in volume:
        return run_dir / "checkpoints"
    return pod_dir / "volumes" / volume["name"]


def pod_mounts(pod: Mapping[str, Any], dir_for: Callable[[str, Mapping[str, Any]], Path],
               kinds: tuple[str, ...] = ()) -> dict[str, Path]:
    """Mount path -> local folder (a mount's subPath inside its volume's folder); `kinds`: only the
    mounts of volumes of these kinds (e.g. persistentVolumeClaim), () = all."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    container = localexec.trainer_container(pod)
    mounts = {}
    for m in container.get("volumeMounts", []):
        volume = volumes.get(m["name"], {"name": m["name"]})
        if kinds and not any(kind in volume for kind in kinds):
            continue
        folder = dir_for(m["mountPath"], volume)
        mounts[m["mountPath"]] = folder / m["subPath"] if m.get("subPath") else folder
    return mounts


@dataclasses.dataclass
class Timeline:
    """What happened when (monotonic seconds), for restart-latency figures and tests."""

    entries: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)

    def add(self, what: str, detail: str = "") -> None:
        self.entries.append((time.monotonic(), what, detail))

    def times(self, what: str) -> list[float]:
        return [t for t, w, _ in self.entries if w == what]


class LocalRunner:
    """Plays API server + kubelet for one job; run() returns the final status (LocalRun: several)."""

    def __init__(
        self,
        manifest: Mapping[str, Any],
        workdir: Path,
        *,
        fresh: bool = False,
        display: Progress | None = None,
        trainer_command: Iterable[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        serve_metrics: bool = True,
        suspend_after_step: int = 0,
        stop_grace: float | None = None,
        settings: Any = None,
        supervisor: localexec.Supervisor | None = None,
    ):
        self.job = api.parse_job(dict(manifest))
        self.settings = settings if settings is not None else builders.BuildSettings()
        # Absolute: every pod process runs in its own folder, and the env hands them these paths.
        self.run_dir = (Path(workdir) / self.job.name).resolve()
        if fresh and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.job = dataclasses.replace(self.job, uid=self.job.uid or str(uuid.uuid4()),
                                       creation_timestamp=self.job.creation_timestamp or localexec.utc_now())
        # A rerun on the same folder resumes the job: the run that wrote the last metrics line announced its
        # alarms already (the planner announces only alarms the status does not hold yet).
        known = progress_from_row(last_json_line(self.checkpoint_dir / "metrics" / "actor-0.jsonl")).get("alarms")
        if known:
            self.job = dataclasses.replace(self.job, status={**self.job.status, "progress": {"alarms": known}})
        self.display = display or Progress(stream=None)
        self.trainer_command = list(trainer_command) if trainer_command is not None else None
        self.extra_env = dict(extra_env or {})
        self.serve_metrics = serve_metrics
        self.suspend_after_step = suspend_after_step
        # Seconds from SIGTERM to SIGKILL when pods are deleted; None = each pod's terminationGracePeriodSeconds
        # (spec.terminationGracePeriodSeconds), in which a stopped trainer saves a last checkpoint.
        self.stop_grace = stop_grace
        self.supervisor = supervisor or localexec.Supervisor()
        # Claim -> folder of every checkpoint volume a pod of this job may mount (LocalRun adds the others').
        self.claims: dict[str, Path] = {builders.checkpoint_claim_name(self.job): self.checkpoint_dir}
        self.addresses = localexec.LocalAddresses(LOCAL_IP)
        self.pods: dict[str, dict[str, Any]] = {}
        # Pods deleted by the last pass, with their final status, shown to the next pass only (as a watch
        # shows a deleted pod terminated before its DELETED event): an exit during the grace period counts.
        self.departed: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.timeline = Timeline()
        self.passes = 0
        self.job_deleted = False
        self._suspend_hook_state = "armed" if suspend_after_step else "off"
        self._stop = threading.Event()
        self._acted = False

    # -- paths ------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def pod_dir(self, name: str) -> Path:
        return self.run_dir / "pods" / name

    def request_stop(self) -> None:
        """Ask run() to stop its processes and return (another thread, or a signal handler)."""
        self._stop.set()
        self.supervisor.changed.set()

    @property
    def finished(self) -> bool:
        return self.job.status.get("phase", "") in api.FINISHED_PHASES or self.job_deleted

    def peer(self) -> chain.PeerJob:
        """This job as the other jobs of a LocalRun see it."""
        return chain.peer_of(self.job.name, self.job.uid, self.job.spec, self.job.status)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> dict[str, Any]:
        return LocalRun([self]).run(timeout)[self.job.name]

    def reconcile_once(self, peers: Mapping[str, chain.PeerJob] | None = None) -> float | None:
        """One pass: observe, plan, execute. Returns the planner's requeue_after."""
        self.passes += 1
        self._apply_suspend_controls()
        rows = self._latest_rows()
        scraped = progress_from_row(rows.get("actor-0"))
        sample = last_json_line(self.checkpoint_dir / "samples" / "actor-0.jsonl")
        if sample:
            scraped["lastSample"] = format_sample(sample)
        progress = merge_progress(self.job.status.get("progress"), scraped, localexec.utc_now())
        departed, self.departed = self.departed, {}
        observed = planner.Observed(
            pods=(*(planner.observe_pod(self.observed_pod_dict(name)) for name in self.pods),
                  *(planner.observe_pod(pod) for name, pod in departed.items() if name not in self.pods)),
            existing=self._existing(),
            progress=progress,
            peers=dict(peers or {}),
        )
        result = planner.plan(self.job, observed, datetime.datetime.now(datetime.UTC), self.settings)
        self._acted = any(isinstance(a, planner.CreateObject | planner.DeletePods) for a in result.actions)
        for action in result.actions:
            self.execute(action)
        self._set_status(result.status)
        self.display.update(self.job, rows)
        return result.requeue_after

    def observed_pod_dict(self, name: str) -> dict[str, Any]:
        return {**self.pods[name], "status": localexec.pod_status(self.supervisor.get(name), LOCAL_IP)}

    def _existing(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.objects)

    def _set_status(self, status: Mapping[str, Any]) -> None:
        old = self.job.status
        self.job = dataclasses.replace(self.job, status=dict(status))
        if status.get("phase") != old.get("phase"):
            self.timeline.add("phase", str(status.get("phase")))
            self.display.line(f"phase: {old.get('phase', '-')} -> {status.get('phase')}", self.job.name)
        if status != old:
            tmp = self.run_dir / "status.json.tmp"
            tmp.write_text(json.dumps(dict(status), indent=2, default=str))
            tmp.replace(self.run_dir / "status.json")

    # -- actions ----------------------------------------------------------------------------------
    @functools.singledispatchmethod
    def execute(self, action: object) -> None:
        raise TypeError(f"local runner: unknown planner action {action!r}")

    @execute.register
    def _(self, action: planner.CreateObject) -> None:
        self.create(action.obj)

    @execute.register
    def _(self, action: planner.DeletePods) -> None:
        names = [n for n in action.names if n in self.pods]
        for proc in self.supervisor.stop(names, self.grace_of(names)):
            pod = self.pods[proc.spec.name]
            self.departed[proc.spec.name] = {
                **pod, "metadata": {**pod["metadata"], "deletionTimestamp": localexec.utc_now()},
                "status": localexec.pod_status(proc, LOCAL_IP)}
        for n in names:
            del self.pods[n]
        if names:
            self.timeline.add("pods_deleted", ",".join(names))

    @execute.register
    def _(self, action: planner.UpdateObject) -> None:
        ref = (action.obj.get("kind", ""), action.obj["metadata"]["name"])
        if ref in self.objects:  # pods started from now on read it (_materialize_config_maps)
            self.objects[ref] = stamp_new_object(dict(action.obj), self.job.namespace)

    @execute.register
    def _(self, action: planner.AnnotatePods) -> None:
        for name in action.names:
            if name in self.pods:
                meta = self.pods[name]["metadata"]
                meta["annotations"] = {**(meta.get("annotations") or {}), **dict(action.annotations)}

    @execute.register
    def _(self, action: planner.DeleteObject) -> None:
        self.objects.pop((action.kind, action.name), None)

    @execute.register
    def _(self, action: planner.DeleteJob) -> None:
        self.job_deleted = True

    @execute.register
    def _(self, action: planner.EmitEvent) -> None:
        self.event(action.type, action.reason, action.message)

    @execute.register
    def _(self, action: planner.AddOwner) -> None:
        pass  # nothing is garbage-collected here: a source's folder stays until its run folder is removed

    def grace_of(self, names: list[str]) -> float:
        """SIGTERM-to-SIGKILL seconds for deleting these pods: the runner's setting, else theirs (as a kubelet)."""
        if self.stop_grace is not None:
            return self.stop_grace
        return float(max((self.pods[n]["spec"].get("terminationGracePeriodSeconds", 30) for n in names
                          if n in self.pods), default=0))

    def create(self, obj: Mapping[str, Any]) -> None:
        obj = stamp_new_object(dict(obj), self.job.namespace)
        name = obj["metadata"]["name"]
        if obj.get("kind") != "Pod":
            self.objects[(obj.get("kind", ""), name)] = obj
            if obj.get("kind") == "PersistentVolumeClaim":
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            return
        if name in self.pods:  # the API server would answer 409: idempotent by name
            return
        self.pods[name] = obj
        self.start_pod(obj)

    def start_pod(self, pod: Mapping[str, Any]) -> None:
        name = pod["metadata"]["name"]
        attempt = pod["metadata"].get("labels", {}).get(wire.LABEL_RESTART_ATTEMPT, "0")
        pod_dir = self.pod_dir(name)
        dir_for = functools.partial(volume_dir, self.run_dir, pod_dir, claims=self.claims)
        mounts = pod_mounts(pod, lambda path, vol: dir_for(path, vol))
        for folder in mounts.values():
            folder.mkdir(parents=True, exist_ok=True)
        # Paths in the trainer config under a claim's mount (a source's /sources/<job>) are local folders here.
        self._materialize_config_maps(pod, pod_mounts(pod, lambda path, vol: dir_for(path, vol),
                                                      kinds=("persistentVolumeClaim",)))
        spec = localexec.translate_pod(
            pod, mounts=mounts, resolve=self.addresses.resolver(attempt), pod_ip=LOCAL_IP,
            pod_dir=pod_dir, metrics_port=localexec.free_port() if self.serve_metrics else 0,
            command=self.trainer_command,
        )
        spec = dataclasses.replace(spec, env={**spec.env, **self.extra_env})
        pod_dir.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "a") as log:
            log.write(f"--- {localexec.utc_now()} start {name} attempt {attempt}: {' '.join(spec.argv)}\n")
        self.supervisor.start(spec)
        self.timeline.add("pod_started", name)

    def _materialize_config_maps(self, pod: Mapping[str, Any], claim_mounts: Mapping[str, Path]) -> None:
        for vol in pod["spec"].get("volumes", []):
            if "configMap" not in vol:
                continue
            cm = self.objects.get(("ConfigMap", vol["configMap"]["name"]))
            if cm is None:
                raise LocalRunError(f"pod {pod['metadata']['name']}: ConfigMap {vol['configMap']['name']} "
                                    "was not created before the pod")
            folder = self.run_dir / "config"
            folder.mkdir(parents=True, exist_ok=True)
            for key, text in cm.get("data", {}).items():
                (folder / key).write_text(localexec.rewrite_json_paths(text, claim_mounts)
                                          if key == wire.CONFIG_FILE else text)

    def event(self, type_: str, reason: str, message: str) -> None:
        line = f"{localexec.utc_now()} {type_} {reason}: {message}"
        with open(self.run_dir / "events.log", "a") as f:
            f.write(line + "\n")
        self.timeline.add("event", reason)
        self.display.line(f"{type_} {reason}: {message}", self.job.name)

    # -- inputs besides the processes -------------------------------------------------------------
    def _latest_rows(self) -> dict[str, dict[str, Any]]:
        rows = {}
        for path in sorted((self.checkpoint_dir / "metrics").glob("*.jsonl")):
            row = last_json_line(path)
            if row is not None:
                rows[path.stem] = row
        return rows

    def _apply_suspend_controls(self) -> None:
        """spec.suspend from the SUSPEND control file and the --suspend-after-step hook."""
        want = (self.run_dir / "SUSPEND").exists()
        step = int(self.job.status.get("progress", {}).get("step", 0) or 0)
        phase = self.job.status.get("phase")
        if self._suspend_hook_state == "armed" and step >= self.suspend_after_step:
            self._suspend_hook_state = "suspending"
            self.display.line(f"suspend hook: suspending at step {step}")
        if self._suspend_hook_state == "suspending":
            if phase == "Suspended" and not self.pods:
                self._suspend_hook_state = "done"
                self.timeline.add("resumed", str(step))
                self.display.line("suspend hook: resuming")
            else:
                want = True
        if want != self.job.spec.suspend:
            # A spec change bumps metadata.generation, as the API server does.
            self.job = dataclasses.replace(self.job, spec=dataclasses.replace(self.job.spec, suspend=want),
                                           generation=self.job.generation + 1)
            self.timeline.add("suspend" if want else "resume")


class LocalRun:
    """Several LocalRunners side by side on one Supervisor, like jobs of one namespace: each pass hands
    every job the others as peers (chain.PeerJob), so the planner holds a job until its `fromJob`
    sources Succeeded and fails it when one failed. run() returns every job's final status."""

    def __init__(self, runners: list[LocalRunner]):
        if len({id(r.supervisor) for r in runners}) != 1:
            raise ValueError("the jobs of a LocalRun share one Supervisor")
        self.runners = runners
        self.supervisor = runners[0].supervisor
        claims = {claim: folder for r in runners for claim, folder in r.claims.items()}
        for r in runners:
            r.claims = claims

    def request_stop(self) -> None:
        for r in self.runners:
            r.request_stop()

    def grace(self) -> float:
        """SIGTERM-to-SIGKILL seconds when every job's pods are stopped at once: the longest of theirs."""
        return max(r.grace_of(list(r.pods)) for r in self.runners)

    def run(self, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        active = list(self.runners)
        try:
            while active and not any(r._stop.is_set() for r in self.runners):
                self.supervisor.changed.clear()
                every = {r.job.name: r.peer() for r in self.runners if not r.job_deleted}
                requeues = [r.reconcile_once({n: p for n, p in every.items() if n != r.job.name}) for r in active]
                acted = any(r._acted for r in active)
                active = [r for r in active if not r.finished]
                if not active:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    left = ", ".join(f"{r.job.name} ({r.job.status.get('phase')})" for r in active)
                    raise TimeoutError(f"jobs not finished after {timeout}s: {left}")
                if acted:
                    continue  # pods just started or stopped: observe them at once, as a watch event would
                due = [q for q in requeues if q is not None]
                wait = min(max(min(due), 0.01), REFRESH_SECONDS) if due else REFRESH_SECONDS
                self.supervisor.changed.wait(wait)
        finally:
            self.supervisor.stop_all(self.grace())
            for r in self.runners:
                r.display.close()
        return {r.job.name: r.job.status for r in self.runners}


class Progress:
    """Per-process progress bars (tqdm, on a TTY) or plain lines: step/maxSteps, live reward, KL, loss.

    Bars: one tqdm bar per metrics file (`actor-0`, ...) plus a status line (phase, restarts);
    line() prints above them (tqdm.write). Plain (not a TTY, --no-progress, or several jobs of one run):
    one line per new step of each rank-0 series, so CI logs stay readable.
    label_jobs: prefix every line with its job (several jobs of one run; plain lines then).
    """

    def __init__(self, stream: Any = sys.stdout, bars: bool | None = None, label_jobs: bool = False):
        self.stream = stream
        self.label_jobs = label_jobs
        self.bars = bool(stream is not None and not label_jobs and (stream.isatty() if bars is None else bars))
        self._bars: dict[str, Any] = {}
        self._status: Any = None
        self._last_plain: dict[tuple[str, str], int] = {}

    def line(self, text: str, job: str = "") -> None:
        if self.stream is None:
            return
        text = f"{job}: {text}" if job and self.label_jobs else text
        if self._bars or self._status is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, job: api.Job, rows: Mapping[str, Mapping[str, Any]]) -> None:
        if self.stream is None:
            return
        max_steps = job.spec.hyperparameters.max_steps
        if not self.bars:
            for name, row in sorted(rows.items()):
                if name.endswith("-0") and row.get("step") != self._last_plain.get((job.name, name)):
                    self._last_plain[(job.name, name)] = row.get("step")
                    label = f"{job.name}/{name}" if self.label_jobs else name
                    print(format_progress_line(label, row, max_steps), file=self.stream, flush=True)
            return
        from tqdm import tqdm

        for name, row in sorted(rows.items()):
            bar = self._bars.get(name)
            if bar is None:
                bar = self._bars[name] = tqdm(total=max_steps, desc=f"{name:<12}", unit="step", file=self.stream,
                                              position=len(self._bars), leave=True, dynamic_ncols=True)
            bar.n = min(int(row.get("step", 0) or 0), max_steps)
            bar.set_postfix_str(_metric_text(row), refresh=False)
            bar.refresh()
        if self._status is None:
            self._status = tqdm(total=0, bar_format="{desc}", file=self.stream, position=len(self._bars) + 1,
                                leave=True)
        self._status.set_description_str(f"{job.name}: {job.status.get('phase', '-')}, "
                                         f"restarts {job.status.get('restarts', 0)}")

    def close(self) -> None:
        for bar in [*self._bars.values(), self._status]:
            if bar is not None:
                bar.close()
        self._bars, self._status = {}, None


def _metric_text(row: Mapping[str, Any]) -> str:
    parts = []
    for key, label in (("reward_mean", "reward"), ("kl", "kl"), ("loss", "loss")):
        if isinstance(row.get(key), int | float):
            parts.append(f"{label} {row[key]:.4g}")
    return "  ".join(parts)


def format_progress_line(name: str, row: Mapping[str, Any], max_steps: int) -> str:
    return f"{name:<12} step {row.get('step', 0)}/{max_steps}  {_metric_text(row)}".rstrip()


def main(args: Any) -> int:
    path = Path(args.manifest)
    try:
        manifests = [resolve_local_paths(m, path.resolve().parent) for m in load_manifests(path)]
    except LocalRunError as e:
        print(f"rlhf-operator run-local: {e}", file=sys.stderr)
        return 2
    display = Progress(sys.stdout, bars=False if args.no_progress else None, label_jobs=len(manifests) > 1)
    supervisor = localexec.Supervisor()
    runners, errors = [], []
    for i, manifest in enumerate(manifests):
        name = (manifest.get("metadata") or {}).get("name") or f"{constants.KIND} {i + 1}"
        try:
            runners.append(LocalRunner(
                manifest, Path(args.workdir), fresh=args.fresh, display=display, supervisor=supervisor,
                suspend_after_step=getattr(args, "suspend_after_step", 0) or 0,
                serve_metrics=not getattr(args, "no_metrics_server", False),
                trainer_command=shlex.split(args.trainer_command) if getattr(args, "trainer_command", "") else None))
        except api.SpecError as e:
            errors.append(f"{path}: {name}: {e}" if len(manifests) > 1 else f"{path}: {e}")
    errors += [f"{path}: {problem}" for problem in missing_sources([r.job for r in runners])]
    errors += [f"{path}: {problem}" for problem in unsupported_sources([r.job for r in runners])]
    errors += [f"{path}: {problem}" for problem in gpu_shortages([r.job for r in runners], len(supervisor.gpus))]
    if errors:
        print("\n".join(f"rlhf-operator run-local: {e}" for e in errors), file=sys.stderr)
        return 2
    for note in cpu_fallback_notes([r.job for r in runners], len(supervisor.gpus)):
        print(f"rlhf-operator run-local: note: {path}: {note}", file=sys.stderr)
    run = LocalRun(runners)
    # SIGTERM (e.g. from a CI timeout) stops the gangs like Ctrl-C does: no orphans either way.
    previous = signal.signal(signal.SIGTERM, lambda *_: run.request_stop())
    for runner in runners:
        print(f"{runner.job.name}: running locally in {runner.run_dir} (logs in pods/<pod>/log.txt)")
    try:
        statuses = run.run()
    except KeyboardInterrupt:
        supervisor.stop_all(run.grace())
        print("\ninterrupted; processes stopped, checkpoints kept in " +
              ", ".join(str(r.checkpoint_dir) for r in runners))
        return 130
    except localexec.GpuShortage as e:  # jobs side by side that each fit alone
        supervisor.stop_all(run.grace())
        print(f"rlhf-operator run-local: {e}; processes stopped, checkpoints kept", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    for runner in runners:
        summarize(runner, statuses[runner.job.name])
    return 0 if all(s.get("phase") == "Succeeded" for s in statuses.values()) else 1


def summarize(runner: LocalRunner, status: Mapping[str, Any]) -> None:
    """The end of a job's run: its phase, why it failed, its report's figures, its exported model."""
    phase = status.get("phase", "stopped")
    print(f"{runner.job.name}: {phase}")
    for cond in status.get("conditions", []):
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            print(f"  {cond.get('reason')}: {cond.get('message')}")
    try:
        png, lines = report.write_report(runner.run_dir)
        print("\n".join(f"  {line}" for line in lines))
        print(f"  report: {png}")
    except report.ReportError as e:
        print(f"  no report: {e}")
    if (runner.checkpoint_dir / wire.EXPORT_DIR).is_dir():
        print(f"  exported model: {runner.checkpoint_dir / wire.EXPORT_DIR}")
