"""Names shared by the CRD, the builders, the planner and the shells (see docs/spec.md)."""

# The custom resource.
GROUP = "rlhf.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RLHFJob"
PLURAL = "rlhfjobs"
SHORT_NAME = "rlhf"

# Labels on every child: the index of child pods is keyed by them.
LABEL_JOB = "rlhf.dev/job"
LABEL_ROLE = "rlhf.dev/role"
LABEL_ROLE_INDEX = "rlhf.dev/role-index"
# Which gang a pod belongs to: pods of an older attempt are stale after a gang restart.
LABEL_RESTART_ATTEMPT = "rlhf.dev/restart-attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "rlhf-operator"
# Kueue admits a whole workload by this label; Volcano reads the queue from the PodGroup.
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# Volcano and coscheduling find a pod's gang through these.
ANNOTATION_VOLCANO_GROUP = "scheduling.k8s.io/group-name"
LABEL_COSCHEDULING_GROUP = "scheduling.x-k8s.io/pod-group"

# Field manager for every write, so `kubectl get --show-managed-fields` says who wrote what.
FIELD_MANAGER = "rlhf-operator"

# Container contract (docs/spec.md "Env contract").
CONTAINER_NAME = "trainer"
TRAINER_COMMAND = ["python", "-m", "rlhf_trainer"]
CONFIG_MOUNT = "/etc/rlhf"
CONFIG_FILE = "config.json"
CHECKPOINT_MOUNT = "/checkpoints"
ROLE_PORT = 29500
BRIDGE_PORT = 29501
METRICS_PORT = 9400
# Non-root uid/gid of the trainer image (trainer_image/Dockerfile creates it).
TRAINER_UID = 1000

# Trainer exit codes that mean "restarting will not help" (sysexits.h EX_DATAERR, EX_CONFIG).
EXIT_DATA_ERROR = 65
EXIT_CONFIG_ERROR = 78
PERMANENT_EXIT_CODES = frozenset({EXIT_DATA_ERROR, EXIT_CONFIG_ERROR})

# Gang restart backoff is capped so a flapping job still retries every few minutes.
MAX_BACKOFF_SECONDS = 300

# Operator metrics endpoint.
OPERATOR_METRICS_PORT = 8080
