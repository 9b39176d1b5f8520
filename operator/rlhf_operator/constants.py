"""Names of the operator's own side of the API: the CRD, managed-by and gang-scheduler labels, the
field manager. What the trainer must agree on (env, ports, mounts, exit codes, the pod labels the
index is keyed by) is in rlhf_contract.wire.
"""

# The custom resource.
GROUP = "rlhf.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RLHFJob"
PLURAL = "rlhfjobs"
SHORT_NAME = "rlhf"

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "rlhf-operator"
# Kueue admits a whole workload by this label; Volcano reads the queue from the PodGroup.
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# "false" on a pod of a Kueue pod group finishes the group: Kueue releases its quota instead of waiting
# for replacement pods. Kueue refuses to remove it or set it back to "true".
ANNOTATION_KUEUE_RETRIABLE = "kueue.x-k8s.io/retriable-in-group"
# Volcano and coscheduling find a pod's gang through these.
ANNOTATION_VOLCANO_GROUP = "scheduling.k8s.io/group-name"
LABEL_COSCHEDULING_GROUP = "scheduling.x-k8s.io/pod-group"

# Field manager for every write, so `kubectl get --show-managed-fields` says who wrote what.
FIELD_MANAGER = "rlhf-operator"

# Gang restart backoff is capped so a flapping job still retries every few minutes.
MAX_BACKOFF_SECONDS = 300

# Operator metrics endpoint.
OPERATOR_METRICS_PORT = 8080
