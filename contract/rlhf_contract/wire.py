"""The wire between operator and trainer: env names, ports, mount paths, exit codes, label keys and
the time format (docs/spec.md "Env contract"). The operator writes these, the trainer reads them.
"""

from __future__ import annotations

from datetime import datetime

# -- env of every trainer process (docs/spec.md "Env contract", in the table's order) ----------------
ENV_JOB = "RLHF_JOB"
ENV_ROLE = "RLHF_ROLE"
ENV_ROLE_RANK = "RLHF_ROLE_RANK"
ENV_ROLE_REPLICAS = "RLHF_ROLE_REPLICAS"
ENV_COLOCATED_ROLES = "RLHF_COLOCATED_ROLES"  # comma list of roles served in-process
ENV_CONFIG = "RLHF_CONFIG"  # path of the trainer config JSON
ENV_ROLE_ADDRS = "RLHF_ROLE_ADDRS"  # role=HOST:PORT,... rank 0 of each role's own world
ENV_BRIDGE_ADDR = "RLHF_BRIDGE_ADDR"  # HOST:PORT of the bridge TCPStore (actor rank 0)
ENV_CHECKPOINT_DIR = "RLHF_CHECKPOINT_DIR"
ENV_RESTART_ATTEMPT = "RLHF_RESTART_ATTEMPT"
ENV_METRICS_PORT = "RLHF_METRICS_PORT"  # 0 = serve no /metrics
# Seconds between SIGTERM and SIGKILL (the pod's terminationGracePeriodSeconds): the time a stopped
# trainer has to save a last checkpoint.
ENV_TERMINATION_GRACE = "RLHF_TERMINATION_GRACE_SECONDS"
ENV_POD_IP = "POD_IP"  # downward API status.podIP
# Trainer processes the pod's entry point starts (the role's processesPerPod); each gets its local rank
# (0..n-1) in RLHF_LOCAL_RANK, and its role rank is RLHF_ROLE_RANK x n + local rank.
ENV_PROCESSES_PER_POD = "RLHF_PROCESSES_PER_POD"
ENV_LOCAL_RANK = "RLHF_LOCAL_RANK"  # set by the entry point for each process it starts, never by the operator
# Where a permanent error's message goes instead of TERMINATION_LOG (local runner, e2e kubelet).
ENV_TERMINATION_LOG = "RLHF_TERMINATION_LOG"
# Experiment trackers' credentials (from the Secrets named in spec.trackers, on actor pods only); the
# trackers' own client libraries read them, so the names are theirs.
ENV_WANDB_API_KEY = "WANDB_API_KEY"
ENV_MLFLOW_TRACKING_TOKEN = "MLFLOW_TRACKING_TOKEN"
# Env values holding addresses (the local runner rewrites them to 127.0.0.1 ports).
ADDRESS_ENV = (ENV_ROLE_ADDRS, ENV_BRIDGE_ADDR)

# -- ports of a trainer pod ----------------------------------------------------------------------
ROLE_PORT = 29500  # rank 0 of a role's own torch.distributed world
BRIDGE_PORT = 29501  # the bridge's TCPStore, on actor rank 0's pod
TRAINER_METRICS_PORT = 9400  # the trainer's Prometheus /metrics (RLHF_METRICS_PORT); local rank k: + k

# -- the trainer container -----------------------------------------------------------------------
CONTAINER_NAME = "trainer"
TRAINER_COMMAND = ("python", "-m", "rlhf_trainer")
CONFIG_MOUNT = "/etc/rlhf"
CONFIG_FILE = "config.json"
CONFIG_PATH = f"{CONFIG_MOUNT}/{CONFIG_FILE}"
CHECKPOINT_MOUNT = "/checkpoints"
# The finished job's model, a Hugging Face folder under the checkpoint volume: what `fromJob` starts from.
EXPORT_DIR = "export"
TERMINATION_LOG = "/dev/termination-log"
# Non-root uid/gid of the trainer image (trainer_image/Dockerfile creates it).
TRAINER_UID = 1000

# -- exit codes: "restarting will not help" (sysexits.h EX_DATAERR, EX_CONFIG) ---------------------
EXIT_DATA_ERROR = 65
EXIT_CONFIG_ERROR = 78
PERMANENT_EXIT_CODES = frozenset({EXIT_DATA_ERROR, EXIT_CONFIG_ERROR})
# A trainer told to stop (SIGTERM) exits 128 + 15 after its last checkpoint, as a process killed by it.
EXIT_STOPPED = 143
# A file a process that got SIGTERM touches under the checkpoint volume, so that the actor ranks of other
# pods learn of it at their next step (e.g. only a critic pod was evicted): `.stop/attempt-<N>`.
STOP_DIR = ".stop"
# Where the optional trackers keep their files under the checkpoint volume: trackers/wandb/ (W&B's run
# folders and the run id a gang restart resumes), trackers/mlflow-run-id, and mlruns/ (MLflow's default store).
TRACKERS_DIR = "trackers"
MLRUNS_DIR = "mlruns"

# -- labels on every child of a job: the operator's index of child pods is keyed by them -----------
LABEL_JOB = "rlhf.dev/job"
LABEL_ROLE = "rlhf.dev/role"
LABEL_ROLE_INDEX = "rlhf.dev/role-index"
# Which gang a pod belongs to: pods of an older attempt are stale after a gang restart.
LABEL_RESTART_ATTEMPT = "rlhf.dev/restart-attempt"

# -- time stamps in status, events and progress (RFC 3339, UTC, seconds) ---------------------------
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_time(moment: datetime) -> str:
    """An aware UTC datetime as Kubernetes writes time stamps: 2026-01-01T00:00:00Z."""
    return moment.strftime(TIME_FORMAT)


def parse_addr(addr: str, name: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); ValueError naming `name` (the env variable) otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{name}: expected HOST:PORT, got {addr!r}")
    return host, int(port)


def format_role_addrs(addrs: dict[str, str]) -> str:
    """{role: "HOST:PORT"} -> `actor=HOST:PORT,critic=HOST:PORT` (RLHF_ROLE_ADDRS)."""
    return ",".join(f"{role}={addr}" for role, addr in addrs.items())


def parse_role_addrs(value: str) -> dict[str, tuple[str, int]]:
    """RLHF_ROLE_ADDRS -> {role: (host, port)}; ValueError naming the bad item."""
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in value.split(","))):
        role, sep, addr = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_ROLE_ADDRS}: expected role=HOST:PORT, got {item!r}")
        out[role] = parse_addr(addr, f"{ENV_ROLE_ADDRS}[{role}]")
    return out
