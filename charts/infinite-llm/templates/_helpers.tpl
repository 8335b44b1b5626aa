{{/*
The name of every object: "<release>-operator", so `helm install infinite-llm` gives the
names the operator defaults to (infinite-llm-operator).
*/}}
{{- define "infinite-llm.fullname" -}}
{{- default (printf "%s-operator" .Release.Name) .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "infinite-llm.selectorLabels" -}}
app.kubernetes.io/name: infinite-llm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "infinite-llm.labels" -}}
{{ include "infinite-llm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "infinite-llm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "infinite-llm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "infinite-llm.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/*
The rules of one kind (ClusterRole or Role) in rbac/operator-rbac.yaml, the one list of the
operator's permissions: the operator tests apply that file as it is, the chart takes its
rules from it, and the operator's start-up check (src/preflight.rs) asks for the same.
Call with (dict "root" $ "kind" "ClusterRole").
*/}}
{{- define "infinite-llm.rules" -}}
{{- $found := dict -}}
{{- range $doc := regexSplit "(?m)^---[ \t]*$" (.root.Files.Get "rbac/operator-rbac.yaml") -1 -}}
{{- $obj := fromYaml $doc -}}
{{- if eq (get $obj "kind") $.kind -}}
{{- $_ := set $found "rules" (get $obj "rules") -}}
{{- end -}}
{{- end -}}
{{- required (printf "rbac/operator-rbac.yaml has no %s with rules" .kind) (get $found "rules") | toYaml -}}
{{- end -}}
