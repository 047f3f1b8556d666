{{/*
Names. The chart name can be overridden, but the Lease name is fixed to "<release>-leader" because
the controller and operators both derive it from the release (see CONTINUITY_LEASE_NAME).
*/}}
{{- define "continuity.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "continuity.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "continuity.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "continuity.selectorLabels" -}}
app.kubernetes.io/name: {{ include "continuity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The selector labels as a label selector string, for the pod labeler (CONTINUITY_POD_SELECTOR). */}}
{{- define "continuity.podSelector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s" (include "continuity.name" .) .Release.Name -}}
{{- end -}}

{{/* The label the leader puts on its own pod; the -leader Service selects it. */}}
{{- define "continuity.roleLabel" -}}continuity.dev/role{{- end -}}

{{- define "continuity.labels" -}}
helm.sh/chart: {{ include "continuity.chart" . }}
{{ include "continuity.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: continuity
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "continuity.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "continuity.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "continuity.configMapName" -}}
{{- default (printf "%s-config" (include "continuity.fullname" .)) .Values.existingConfigMap -}}
{{- end -}}

{{- define "continuity.leaseName" -}}
{{- printf "%s-leader" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "continuity.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/*
PromQL label matcher that picks this release's controller out of everything Prometheus scrapes.
With the ServiceMonitor, the Prometheus Operator sets job=<Service name> and namespace=<namespace>.
*/}}
{{- define "continuity.metricSelector" -}}
{{- if .Values.prometheusRule.metricSelector -}}
{{- .Values.prometheusRule.metricSelector -}}
{{- else -}}
{{- printf "job=%q, namespace=%q" (include "continuity.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
Refuse wildcards in RBAC rules: a playbook that "needs *" has not been thought through, and the
whole point of listing playbook permissions in values is that a reviewer can read them.
*/}}
{{- define "continuity.checkRule" -}}
{{- range $field := list "apiGroups" "resources" "verbs" "resourceNames" -}}
{{- range $v := (get $.rule $field | default list) -}}
{{- if contains "*" $v -}}
{{- fail (printf "rbac.playbookRules: wildcard %q in %s is not allowed; list the exact %s the playbook needs" $v $field $field) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $.rule.verbs -}}
{{- fail "rbac.playbookRules: every rule needs verbs" -}}
{{- end -}}
{{- if not $.rule.resources -}}
{{- fail "rbac.playbookRules: every rule needs resources" -}}
{{- end -}}
{{- end -}}

{{/* One PolicyRule with the chart-only keys (scope, namespaces, description) stripped. */}}
{{- define "continuity.policyRule" -}}
- apiGroups: {{ toJson (.apiGroups | default (list "")) }}
  resources: {{ toJson .resources }}
  {{- with .resourceNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
  verbs: {{ toJson .verbs }}
{{- end -}}

{{/* The Secret that holds the API token: the one named, or "<fullname>-api-token". */}}
{{- define "continuity.apiTokenSecret" -}}
{{- .Values.apiToken.secretName | default (printf "%s-api-token" (include "continuity.fullname" .)) -}}
{{- end -}}
