{{- /* Chart-local helpers; the injection API lives in _sidecar.tpl. */ -}}


{{- define "llm-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: llm-sidecar
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ include "llm-sidecar.appVersion" . | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "llm-sidecar.exampleSelectorLabels" -}}
app.kubernetes.io/name: llm-sidecar-example
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}
