"""`rlhf-operator run-local MANIFEST`: run an RLHFJob on this machine, no cluster (the embedded default).

The same builders and planner as the kopf operator decide everything; this module only plays the
API server and the kubelet for them:

    manifest --api.parse_job--> Job
    loop:  pods' processes --pod_status--> pod dicts --planner.observe_pod--> Observed
           planner.plan(job, observed, now) -> actions + status
           CreateObject(Pod)  -> start `python -m rlhf_trainer` as a process group (localexec)
           CreateObject(ConfigMap / PVC / ...) -> local files and folders under runs/<job>/
           DeletePods          -> SIGTERM, grace, SIGKILL the process groups
           wait for a process exit, the planner's requeue_after, or the next progress refresh
    until status.phase is Succeeded or Failed.

runs/<job>/ holds config/config.json (the ConfigMap), checkpoints/ (the volume: step-N/,
metrics/, export/), pods/<pod>/log.txt, events.log, status.json and report.png.
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

from rlhf_operator import api, builders, constants, localexec, planner, report
from rlhf_operator.progress import merge_progress

LOCAL_IP = "127.0.0.1"
# How often progress bars and status.progress refresh while nothing else wakes the loop.
REFRESH_SECONDS = 0.5


class LocalRunError(RuntimeError):
    """The manifest cannot run locally (unreadable, not one RLHFJob, invalid spec)."""


def load_manifest(path: Path) -> dict[str, Any]:
    """The single RLHFJob document of a YAML file; errors name the file."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except OSError as e:
        raise LocalRunError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LocalRunError(f"{path}: not YAML: {e}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == constants.KIND]
    if len(jobs) != 1:
        raise LocalRunError(f"{path}: expected exactly one {constants.KIND} document, found {len(jobs)}")
    if jobs[0].get("apiVersion") != constants.API_VERSION:
        raise LocalRunError(f"{path}: apiVersion must be {constants.API_VERSION}")
    return jobs[0]


# Manifest fields that name files: run-local reads a relative one against the manifest's folder.
LOCAL_PATH_FIELDS = (("model", "path"), ("rewardModel", "path"), ("dataset", "path"), ("dataset", "evalPath"))


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
    return {key: kind(row[name]) for key, (name, kind) in fields.items()
            if isinstance(row.get(name), int | float) and row[name] == row[name]}


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


def volume_dir(run_dir: Path, pod_dir: Path, mount_path: str, volume: Mapping[str, Any]) -> Path:
    """Local folder standing in for a pod volume: the config, the shared checkpoint volume, scratch."""
    if "configMap" in volume:
        return run_dir / "config"
    if mount_path == wire.CHECKPOINT_MOUNT or "persistentVolumeClaim" in volume:
        return run_dir / "checkpoints"
    return pod_dir / "volumes" / volume["name"]


def pod_mounts(pod: Mapping[str, Any], dir_for: Callable[[str, Mapping[str, Any]], Path]) -> dict[str, Path]:
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    container = localexec.trainer_container(pod)
    return {m["mountPath"]: dir_for(m["mountPath"], volumes.get(m["name"], {"name": m["name"]}))
            for m in container.get("volumeMounts", [])}


@dataclasses.dataclass
class Timeline:
    """What happened when (monotonic seconds), for restart-latency figures and tests."""

    entries: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)

    def add(self, what: str, detail: str = "") -> None:
        self.entries.append((time.monotonic(), what, detail))

    def times(self, what: str) -> list[float]:
        return [t for t, w, _ in self.entries if w == what]


class LocalRunner:
    """Plays API server + kubelet for one job; run() returns the final status."""

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
        self.display = display or Progress(stream=None)
        self.trainer_command = list(trainer_command) if trainer_command is not None else None
        self.extra_env = dict(extra_env or {})
        self.serve_metrics = serve_metrics
        self.suspend_after_step = suspend_after_step
        # Seconds from SIGTERM to SIGKILL when pods are deleted; None = each pod's terminationGracePeriodSeconds
        # (spec.terminationGracePeriodSeconds), in which a stopped trainer saves a last checkpoint.
        self.stop_grace = stop_grace
        self.supervisor = localexec.Supervisor()
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

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stop.is_set():
                self.supervisor.changed.clear()
                requeue = self.reconcile_once()
                phase = self.job.status.get("phase", "")
                if phase in api.FINISHED_PHASES or self.job_deleted:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.job.name} not finished after {timeout}s (phase {phase})")
                if self._acted:
                    continue  # pods just started or stopped: observe them at once, as a watch event would
                wait = REFRESH_SECONDS if requeue is None else min(max(requeue, 0.01), REFRESH_SECONDS)
                self.supervisor.changed.wait(wait)
        finally:
            self.supervisor.stop_all(self.grace_of(list(self.pods)))
            self.display.close()
        return self.job.status

    def reconcile_once(self) -> float | None:
        """One pass: observe, plan, execute. Returns the planner's requeue_after."""
        self.passes += 1
        self._apply_suspend_controls()
        rows = self._latest_rows()
        progress = merge_progress(self.job.status.get("progress"), progress_from_row(rows.get("actor-0")),
                                  localexec.utc_now())
        departed, self.departed = self.departed, {}
        observed = planner.Observed(
            pods=(*(planner.observe_pod(self.observed_pod_dict(name)) for name in self.pods),
                  *(planner.observe_pod(pod) for name, pod in departed.items() if name not in self.pods)),
            existing=self._existing(),
            progress=progress,
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
            self.display.line(f"phase: {old.get('phase', '-')} -> {status.get('phase')}")
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
        mounts = pod_mounts(pod, lambda path, vol: volume_dir(self.run_dir, pod_dir, path, vol))
        for folder in mounts.values():
            folder.mkdir(parents=True, exist_ok=True)
        self._materialize_config_maps(pod)
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

    def _materialize_config_maps(self, pod: Mapping[str, Any]) -> None:
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
                (folder / key).write_text(text)

    def event(self, type_: str, reason: str, message: str) -> None:
        line = f"{localexec.utc_now()} {type_} {reason}: {message}"
        with open(self.run_dir / "events.log", "a") as f:
            f.write(line + "\n")
        self.timeline.add("event", reason)
        self.display.line(f"{type_} {reason}: {message}")

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


class Progress:
    """Per-role bars (TTY) or plain lines: step/maxSteps, live reward and KL from the metrics JSONL."""

    def __init__(self, stream: Any = sys.stdout, bars: bool | None = None):
        self.stream = stream
        self.bars = bool(stream is not None and (stream.isatty() if bars is None else bars))
        self._drawn = 0
        self._last_plain: dict[str, int] = {}

    def line(self, text: str) -> None:
        if self.stream is None:
            return
        self._erase()
        print(text, file=self.stream, flush=True)

    def update(self, job: api.Job, rows: Mapping[str, Mapping[str, Any]]) -> None:
        if self.stream is None:
            return
        max_steps = job.spec.hyperparameters.max_steps
        if not self.bars:
            for name, row in sorted(rows.items()):
                if name.endswith("-0") and row.get("step") != self._last_plain.get(name):
                    self._last_plain[name] = row.get("step")
                    print(format_progress_line(name, row, max_steps), file=self.stream, flush=True)
            return
        self._erase()
        lines = [format_progress_bar(name, row, max_steps) for name, row in sorted(rows.items())]
        lines.append(f"{job.name}: {job.status.get('phase', '-')}, restarts {job.status.get('restarts', 0)}")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)

    def _erase(self) -> None:
        if self.bars and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def close(self) -> None:
        self._drawn = 0


def _metric_text(row: Mapping[str, Any]) -> str:
    parts = []
    for key, label in (("reward_mean", "reward"), ("kl", "kl"), ("loss", "loss")):
        if isinstance(row.get(key), int | float):
            parts.append(f"{label} {row[key]:.4g}")
    return "  ".join(parts)


def format_progress_line(name: str, row: Mapping[str, Any], max_steps: int) -> str:
    return f"{name:<12} step {row.get('step', 0)}/{max_steps}  {_metric_text(row)}".rstrip()


def format_progress_bar(name: str, row: Mapping[str, Any], max_steps: int, width: int = 24) -> str:
    step = int(row.get("step", 0) or 0)
    filled = min(width, width * step // max(max_steps, 1))
    return f"{name:<12} [{'#' * filled}{'.' * (width - filled)}] {step}/{max_steps}  {_metric_text(row)}".rstrip()


def main(args: Any) -> int:
    display = Progress(sys.stdout, bars=False if args.no_progress else None)
    try:
        manifest = resolve_local_paths(load_manifest(Path(args.manifest)), Path(args.manifest).resolve().parent)
        runner = LocalRunner(manifest, Path(args.workdir), fresh=args.fresh, display=display,
                             suspend_after_step=getattr(args, "suspend_after_step", 0) or 0,
                             serve_metrics=not getattr(args, "no_metrics_server", False),
                             trainer_command=shlex.split(args.trainer_command) if getattr(args, "trainer_command", "")
                             else None)
    except (LocalRunError, api.SpecError) as e:
        print(f"rlhf-operator run-local: {e}", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from a CI timeout) stops the gang like Ctrl-C does: no orphans either way.
    previous = signal.signal(signal.SIGTERM, lambda *_: runner.request_stop())
    print(f"{runner.job.name}: running locally in {runner.run_dir} (logs in pods/<pod>/log.txt)")
    try:
        status = runner.run()
    except KeyboardInterrupt:
        runner.supervisor.stop_all(runner.grace_of(list(runner.pods)))
        print(f"\n{runner.job.name}: interrupted; processes stopped, checkpoints kept in {runner.checkpoint_dir}")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
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
    if (runner.checkpoint_dir / "export").is_dir():
        print(f"  exported model: {runner.checkpoint_dir / 'export'}")
    return 0 if phase == "Succeeded" else 1
