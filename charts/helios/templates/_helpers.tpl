{{/* The chart's name, cut to 63 characters. */}}
{{- define "helios.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: release name and chart name, unless the release already holds it. */}}
{{- define "helios.fullname" -}}
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

{{- define "helios.selectorLabels" -}}
app.kubernetes.io/name: {{ include "helios.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "helios.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "helios.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: helios
{{- end }}

{{- define "helios.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "helios.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "helios.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* RBAC rules, from files/rbac.yaml (the one place they are written). */}}
{{- define "helios.namespacedRules" -}}
{{- $rules := .Files.Get "files/rbac.yaml" | fromYaml }}
{{- $out := $rules.namespaced }}
{{- if eq (include "helios.workerMonitors" .) "true" }}
{{- $out = concat $out $rules.serviceMonitor }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{- define "helios.clusterRules" -}}
{{- $rules := .Files.Get "files/rbac.yaml" | fromYaml }}
{{- $out := $rules.cluster }}
{{- if .Values.watchNamespaces }}
{{- $out = concat $out $rules.namespaceScanning }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* serviceMonitor.enabled is true, false or auto. The operator makes the workers' ServiceMonitors
unless it is false (it looks for the CRD itself, so one installed later is found); the chart's own
ServiceMonitor needs the CRD now: true, or auto where the API server serves it. */}}
{{- define "helios.workerMonitors" -}}
{{- ne (toString .Values.serviceMonitor.enabled) "false" }}
{{- end }}

{{- define "helios.ownMonitor" -}}
{{- $mode := toString .Values.serviceMonitor.enabled }}
{{- or (eq $mode "true") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor")) }}
{{- end }}

{{/* serviceMonitor.labels as the operator's HELIOS_SERVICE_MONITOR_LABELS (key=value,...). */}}
{{- define "helios.monitorLabels" -}}
{{- $pairs := list }}
{{- range $k, $v := .Values.serviceMonitor.labels }}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
