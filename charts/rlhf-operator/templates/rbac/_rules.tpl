{{/*
The operator's API rights, one rule per line of need. "application" rules are what
operator/rlhf_operator/kube/ calls; "framework" rules are what kopf itself needs. kopf runs
standalone (replicas: 1), so there are no kopfpeerings rules. tests/unit/test_chart.py holds the
expected table: change both together.
*/}}

{{/* Rules scoped to the namespaces holding jobs: a Role per watched namespace, or the ClusterRole. */}}
{{- define "rlhf-operator.namespacedRules" -}}
# application: watch and reconcile RLHFJobs; kopf (framework) also patches them for its finalizer
# and progress annotations.
- apiGroups: ["rlhf.dev"]
  resources: ["rlhfjobs"]
  verbs: ["get", "list", "watch", "patch"]
# application: one status write per reconcile pass.
- apiGroups: ["rlhf.dev"]
  resources: ["rlhfjobs/status"]
  verbs: ["patch"]
# application: the role pods of every gang (created, indexed, deleted on gang restart).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# application: headless Service, trainer-config ConfigMap, checkpoint PVC of every job.
- apiGroups: [""]
  resources: ["services", "configmaps", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "delete"]
# framework + application: kopf posts handler events; the operator posts job events.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# application: job events through the events.k8s.io API.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.gangSchedulers.volcano.enabled }}
# application: gang scheduling with Volcano (one PodGroup per job).
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["get", "list", "watch", "create", "delete"]
{{- end }}
{{- if .Values.gangSchedulers.coscheduling.enabled }}
# application: gang scheduling with scheduler-plugins coscheduling (one PodGroup per job).
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["get", "list", "watch", "create", "delete"]
{{- end }}
{{- end }}

{{/* Rules that only exist cluster-wide. */}}
{{- define "rlhf-operator.clusterRules" -}}
# framework: kopf scans CRDs at startup and on changes to find the resources it serves.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if not .Values.watchNamespaces }}
# framework: kopf follows namespaces appearing and going when it watches all of them.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
