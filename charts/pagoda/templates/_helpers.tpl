{{/* The chart's name, overridable for forks. */}}
{{- define "pagoda.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name, with the chart name appended unless the release already holds it. */}}
{{- define "pagoda.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "pagoda.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "pagoda.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* component=operator keeps these apart from the engine pods (managed-by: pagoda-operator). */}}
{{- define "pagoda.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagoda.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "pagoda.labels" -}}
{{ include "pagoda.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "pagoda.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pagoda.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pagoda.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "pagoda.engineImage" -}}
{{- printf "%s:%s" .Values.engineImage.repository (default .Chart.AppVersion .Values.engineImage.tag) }}
{{- end }}

{{- define "pagoda.routerImage" -}}
{{- with .Values.routerImage.repository }}
{{- printf "%s:%s" . (default $.Chart.AppVersion $.Values.routerImage.tag) }}
{{- end }}
{{- end }}

{{/*
The rights the operator uses in a namespace it watches:
- llmdeployments: kopf watches them and patches finalizers, its progress annotations and status;
  the builtin autoscaler writes the replica count through the scale subresource.
- llmdeployments/finalizers: the children's owner references set blockOwnerDeletion, which the
  OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift) allows only with this right.
- the children it creates, adopts and removes when the spec stops asking for them.
- pods: it lists and watches the engine pods, flips pagoda.dev/serving and sets pod-deletion-cost
  (patch only: no create, delete or exec).
- events: kopf reports handler progress and errors as events.
*/}}
{{- define "pagoda.namespacedRules" -}}
- apiGroups: [pagoda.dev]
  resources: [llmdeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [pagoda.dev]
  resources: [llmdeployments/status, llmdeployments/scale]
  verbs: [patch]
- apiGroups: [pagoda.dev]
  resources: [llmdeployments/finalizers]
  verbs: [update]
{{- /* Children are server-side applied (get, then create or patch) and never watched or listed; the
router's children (its Deployment, PDB, Services, ServiceAccount, Role, RoleBinding, InferencePool) are
deleted when spec.router drops them. */}}
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch, delete]
{{- /* RBAC forbids granting what one does not hold (no escalate verb here): the router's Role reads
EndpointSlices, so the operator holds that read too. */}}
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch, delete]
{{- /* The one child the operator removes: the HPA, when autoscaling leaves hpa mode. */}}
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, patch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
{{- /* Reads the volume attach/mount failures of its engine pods, to report them as Degraded. */}}
- apiGroups: [""]
  resources: [events]
  verbs: [list]
{{- if .Values.watchNamespaces }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [list, watch, patch, get]
{{- end }}
{{- end }}

{{/* kopf's own cluster-wide needs: it follows namespaces and CRDs to know what it can watch. */}}
{{- define "pagoda.clusterRules" -}}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if not .Values.watchNamespaces }}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [list, watch, patch, get]
{{- end }}
{{- end }}

{{/*
CEL for the admission policy (admission-policy.yaml), one line each. The argument names the object:
"object" (after the change; null on DELETE) or "oldObject" (before; null on CREATE and CONNECT). They never
fail on a missing field (has() first), since an evaluation error with failurePolicy Fail refuses the request.
*/}}
{{- define "pagoda.managedExpression" -}}
{{ include "pagoda.present" . }} && has({{ . }}.metadata.labels) && 'app.kubernetes.io/managed-by' in {{ . }}.metadata.labels && {{ . }}.metadata.labels['app.kubernetes.io/managed-by'] == 'pagoda-operator' && has({{ . }}.metadata.ownerReferences) && {{ . }}.metadata.ownerReferences.exists(o, o.kind == 'LLMDeployment' && o.apiVersion.startsWith('pagoda.dev/'))
{{- end }}

{{- define "pagoda.enginePodExpression" -}}
{{ include "pagoda.present" . }} && has({{ . }}.metadata.labels) && 'app.kubernetes.io/name' in {{ . }}.metadata.labels && {{ . }}.metadata.labels['app.kubernetes.io/name'] == 'pagoda' && 'app.kubernetes.io/managed-by' in {{ . }}.metadata.labels && {{ . }}.metadata.labels['app.kubernetes.io/managed-by'] == 'pagoda-operator'
{{- end }}

{{- /* Whether the request carries that object, told by the operation rather than a comparison with null. */}}
{{- define "pagoda.present" -}}
{{- if eq . "object" -}}
request.operation in ['CREATE', 'UPDATE']
{{- else -}}
request.operation in ['UPDATE', 'DELETE']
{{- end }}
{{- end }}

{{/* (list FIELD KEY): object.metadata.FIELD equals oldObject's but for KEY (labels or annotations). */}}
{{- define "pagoda.onlyKeyChanges" -}}
{{- $field := index . 0 }}{{ $key := index . 1 -}}
(!has(object.metadata.{{ $field }}) || object.metadata.{{ $field }}.all(k, k == '{{ $key }}' || (has(oldObject.metadata.{{ $field }}) && k in oldObject.metadata.{{ $field }} && oldObject.metadata.{{ $field }}[k] == object.metadata.{{ $field }}[k]))) && (!has(oldObject.metadata.{{ $field }}) || oldObject.metadata.{{ $field }}.all(k, k == '{{ $key }}' || (has(object.metadata.{{ $field }}) && k in object.metadata.{{ $field }})))
{{- end }}
