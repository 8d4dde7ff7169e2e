{{/* Names, labels and checks shared by the templates. */}}

{{- define "serin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "serin.fullname" -}}
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

{{- define "serin.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "serin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "serin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "serin.labels" -}}
helm.sh/chart: {{ include "serin.chart" . }}
{{ include "serin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: serin
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "serin.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "serin.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "serin.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.namespace }}
{{- end }}

{{- define "serin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Values that would install a controller that cannot work, or two controllers that both write, fail here with
a message that says what to change.
*/}}
{{- define "serin.validateValues" -}}
{{- if and .Values.namespaced (empty .Values.watchNamespaces) }}
{{- fail "namespaced=true needs at least one namespace in watchNamespaces (e.g. --set 'watchNamespaces={team-a,team-b}')" }}
{{- end }}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicas=%d needs leaderElection.enabled=true: without a Lease every replica would write" (int .Values.replicas)) }}
{{- end }}
{{- range .Values.watchNamespaces }}
{{- if empty . }}
{{- fail "watchNamespaces must not contain an empty namespace name" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Rules for the namespaced resources the controller manages; shared by the ClusterRole and the per-namespace Roles.
Each verb is one the controller's requests use (crates/serin/tests/rbac_e2e.rs fails for a grant no request needs and for a
request no grant allows; docs/security.md says which code path needs which).
*/}}
{{- define "serin.namespacedRules" -}}
# Rollouts are owned by their users (and Git): the controller reads them and replaces their status.
- apiGroups: ["serin.dev"]
  resources: ["rollouts"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["serin.dev"]
  resources: ["rollouts/status"]
  verbs: ["update"]
# ReplicaSets, AnalysisRuns and the canary Ingress carry blockOwnerDeletion owner references to their
# Rollout, which needs this where the OwnerReferencesPermissionEnforcement admission plugin is on.
- apiGroups: ["serin.dev"]
  resources: ["rollouts/finalizers"]
  verbs: ["update"]
# Templates are read one by one when a run is created or its Secrets are checked, never listed.
- apiGroups: ["serin.dev"]
  resources: ["analysistemplates"]
  verbs: ["get"]
# Runs: created per analysis, terminated by a merge patch, old ones deleted; the runner replaces status.
- apiGroups: ["serin.dev"]
  resources: ["analysisruns"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["serin.dev"]
  resources: ["analysisruns/status"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["replicasets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Services are the user's: Serin only patches their selectors.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "patch"]
# Secrets referenced by analysis arguments and Prometheus credentials are read one by one, never listed.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events are recorded through events.k8s.io (a repeated event is patched into a series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Routing objects are the user's: Serin patches only the weights and routes it manages.
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["networking.istio.io"]
  resources: ["virtualservices", "destinationrules"]
  verbs: ["get", "list", "watch", "patch"]
# The NGINX router creates and deletes its managed canary copy of the stable Ingress.
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}

{{- define "serin.clusterAnalysisTemplateRules" -}}
# ClusterAnalysisTemplates are read one by one, like AnalysisTemplates.
- apiGroups: ["serin.dev"]
  resources: ["clusteranalysistemplates"]
  verbs: ["get"]
{{- end }}
