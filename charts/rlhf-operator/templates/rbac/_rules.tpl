{{/*
The operator's API rights, exactly what it uses (operator/rlhf_operator/kube/):
- "framework": what kopf itself does. Every kind the handlers index or watch (handlers.py) is listed
  and watched; kopf posts Warning events for failing handlers; it scans CRDs; in namespaced mode it
  observes namespaces. kopf runs standalone (replicas: 1), so there are no kopfpeerings rules, and
  there are no on.create/update/delete handlers, so kopf never patches RLHFJobs (no finalizers, no
  progress annotations).
- "application": the raw REST writes of kube/executor.py as the planner asks for them.
The reconcile reads everything from kopf's indexes, so there is no "get" anywhere.
tests/unit/test_chart.py holds the expected table and checks it against kopf's handler registry.
*/}}

{{/* Rules scoped to the namespaces holding jobs: a Role per watched namespace, or the ClusterRole. */}}
{{- define "rlhf-operator.namespacedRules" -}}
# framework: kopf watches the jobs and indexes and watches every kind of child (handlers.py).
- apiGroups: ["rlhf.dev"]
  resources: ["rlhfjobs"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods", "services", "configmaps", "persistentvolumeclaims"]
  verbs: ["list", "watch"]
{{- if .Values.gangSchedulers.volcano.enabled }}
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["list", "watch"]
{{- end }}
{{- if .Values.gangSchedulers.coscheduling.enabled }}
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["list", "watch"]
{{- end }}
# framework: kopf posts Warning events about failing handlers; application: job events
# (Created, Restarting, Failed, ...), both through core/v1; a recurring warning (StatusWriteFailed,
# RequestRefused) is read and patched to count its repeats, as client-go's event correlator does.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "get", "patch"]
# application: one status write per reconcile pass.
- apiGroups: ["rlhf.dev"]
  resources: ["rlhfjobs/status"]
  verbs: ["patch"]
# application: a finished job is deleted after spec.ttlSecondsAfterFinished.
- apiGroups: ["rlhf.dev"]
  resources: ["rlhfjobs"]
  verbs: ["delete"]
# application: the gang's pods, created per attempt, deleted on gang restart, suspend and finish;
# patched once when a failed job's Kueue pod group gives its quota back (retriable-in-group).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["create", "delete", "patch"]
# application: headless Service, trainer-config ConfigMap and checkpoint PVC of each job; they go
# with the job through owner references (a retained PVC stays), so the operator never deletes them.
- apiGroups: [""]
  resources: ["services", "configmaps", "persistentvolumeclaims"]
  verbs: ["create"]
# application: a spec edit rolled out rewrites the trainer-config ConfigMap.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["patch"]
# application: a job started from another job's export (fromJob) adds itself as a further owner of
# that job's checkpoint PVC when it goes with its job (retain: false), so the PVC outlives the source
# job while the dependant exists (docs/spec.md, Chaining jobs).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["patch"]
{{- if .Values.gangSchedulers.volcano.enabled }}
# application: gang scheduling with Volcano, one PodGroup per job, deleted when
# the job finishes (Volcano reserves its minResources).
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["create", "delete"]
{{- end }}
{{- if .Values.gangSchedulers.coscheduling.enabled }}
# application: gang scheduling with scheduler-plugins coscheduling, one PodGroup per job, deleted
# when the job finishes.
- apiGroups: ["scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["create", "delete"]
{{- end }}
{{- end }}

{{/* Rules that only exist cluster-wide. */}}
{{- define "rlhf-operator.clusterRules" -}}
# framework: kopf scans CRDs at startup and follows them, to serve only the kinds that exist.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
# framework: with a namespace list, kopf's namespace observer lists and watches namespaces (it
# skips this when watching all namespaces).
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}
