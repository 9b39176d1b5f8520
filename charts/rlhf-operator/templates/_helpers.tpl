{{/*
Names, labels and the image reference shared by every template.
*/}}

{{/* Chart name, overridable. */}}
{{- define "rlhf-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless the release already has it. */}}
{{- define "rlhf-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart label value: name-version. */}}
{{- define "rlhf-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod; never change them (Deployment selectors are immutable). */}}
{{- define "rlhf-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlhf-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "rlhf-operator.labels" -}}
helm.sh/chart: {{ include "rlhf-operator.chart" . }}
{{ include "rlhf-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlhf-operator
{{- end }}

{{/* The operator's service account name. */}}
{{- define "rlhf-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlhf-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Operator image: repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "rlhf-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Namespaces whose jobs the operator handles; empty list = all namespaces. */}}
{{- define "rlhf-operator.trainerNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
Fail early when a monitor is enabled on a cluster without the Prometheus Operator CRDs: otherwise
the install dies half-way with "no matches for kind ServiceMonitor". `helm template` can be told
the API exists with --api-versions monitoring.coreos.com/v1.
Call with (dict "ctx" $ "monitor" "serviceMonitor").
*/}}
{{- define "rlhf-operator.requireMonitoringAPI" -}}
{{- if not (.ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}
{{- fail (printf "metrics.%s.enabled=true needs the Prometheus Operator CRDs (API monitoring.coreos.com/v1), which this cluster does not serve: install the Prometheus Operator (e.g. kube-prometheus-stack) first, or set metrics.%s.enabled=false. With helm template, pass --api-versions monitoring.coreos.com/v1." .monitor .monitor) }}
{{- end }}
{{- end }}
