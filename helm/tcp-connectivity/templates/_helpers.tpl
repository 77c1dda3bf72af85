{{/*
The app.kubernetes.io/name label.
*/}}
{{- define "tcpc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: the release name unless overridden. Short enough
that the longest suffix ("-edge-gateway-headless", 22) keeps a Service name within 63.
*/}}
{{- define "tcpc.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 41 | trimSuffix "-" }}
{{- end }}

{{- define "tcpc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Object names. Call with the root context.
*/}}
{{- define "tcpc.edge.fullname" -}}
{{- include "tcpc.fullname" . }}-edge-gateway
{{- end }}
{{- define "tcpc.worker.fullname" -}}
{{- include "tcpc.fullname" . }}-script-worker
{{- end }}

{{/*
Labels. Call with (dict "ctx" $ "component" "edge-gateway"); component may be "" for
objects shared by both services.
*/}}
{{- define "tcpc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tcpc.name" .ctx | quote }}
app.kubernetes.io/instance: {{ .ctx.Release.Name | quote }}
{{- with .component }}
app.kubernetes.io/component: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "tcpc.labels" -}}
helm.sh/chart: {{ include "tcpc.chart" .ctx | quote }}
{{ include "tcpc.selectorLabels" . }}
app.kubernetes.io/version: {{ include "tcpc.imageTag" .ctx | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service | quote }}
app.kubernetes.io/part-of: thingspanel
{{- end }}

{{- define "tcpc.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "tcpc.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "tcpc.imageTag" .) }}
{{- end }}

{{/*
ServiceAccount names.
*/}}
{{- define "tcpc.edge.serviceAccountName" -}}
{{- if .Values.edge.serviceAccount.create }}
{{- default (include "tcpc.edge.fullname" .) .Values.edge.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.edge.serviceAccount.name }}
{{- end }}
{{- end }}
{{- define "tcpc.worker.serviceAccountName" -}}
{{- if .Values.worker.serviceAccount.create }}
{{- default (include "tcpc.worker.fullname" .) .Values.worker.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An environment variable's value as the services parse it: numbers without exponent
(values files make every number a float64: 1000000 would print as 1e+06), quoted.
*/}}
{{- define "tcpc.envValue" -}}
{{- if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . | toString | quote }}{{ else }}{{ toString . | quote }}{{ end }}
{{- else }}
{{- toString . | quote }}
{{- end }}
{{- end }}

{{/*
Seconds as the services' durations ("45s").
*/}}
{{- define "tcpc.seconds" -}}
{{- printf "%ds" (int64 .) | quote }}
{{- end }}

{{/*
The edge pod's grace period: preStop sleep + the edge's own shutdown budget + margin.
*/}}
{{- define "tcpc.edge.terminationGracePeriodSeconds" -}}
{{- with .Values.edge.shutdown }}
{{- add .preStopSleepSeconds .timeoutSeconds .graceMarginSeconds }}
{{- end }}
{{- end }}

{{/*
Which pods the workers watch as edges.
*/}}
{{- define "tcpc.worker.edgePodSelector" -}}
{{- .Values.worker.podWatch.selector | default (printf "app.kubernetes.io/instance=%s,app.kubernetes.io/component=edge-gateway" .Release.Name) }}
{{- end }}

{{/*
Does the worker mount a script library?
*/}}
{{- define "tcpc.worker.hasScripts" -}}
{{- if or .Values.worker.scripts.configMaps .Values.worker.scripts.inline }}true{{ end }}
{{- end }}

{{/*
The MQTT password's Secret and key.
*/}}
{{- define "tcpc.worker.mqttSecretName" -}}
{{- .Values.worker.mqtt.existingSecret | default (printf "%s-mqtt" (include "tcpc.worker.fullname" .)) }}
{{- end }}
{{- define "tcpc.worker.mqttSecretKey" -}}
{{- if .Values.worker.mqtt.existingSecret }}{{ .Values.worker.mqtt.existingSecretKey }}{{ else }}mqtt-password{{ end }}
{{- end }}

{{/*
A component's topology spread constraints, each with the component's labelSelector
unless it has one. Call with (dict "ctx" $ "component" "edge-gateway" "constraints" list).
*/}}
{{- define "tcpc.topologySpreadConstraints" -}}
{{- $selector := dict "matchLabels" (include "tcpc.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml) }}
{{- range .constraints }}
- {{ merge (dict) . (dict "labelSelector" $selector) | toYaml | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/*
Checks across values that the schema cannot express; rendered by every template through
the ConfigMap (any failure stops the release).
*/}}
{{- define "tcpc.validate" -}}
{{- with .Values.edge.shutdown }}
{{- if lt (int64 .timeoutSeconds) (add .drainWindowSeconds .closeFlushSeconds .publishTimeoutSeconds | int64) }}
{{- fail (printf "edge.shutdown.timeoutSeconds (%v) must cover drainWindowSeconds + closeFlushSeconds + publishTimeoutSeconds (%v): the edge refuses to start otherwise" .timeoutSeconds (add .drainWindowSeconds .closeFlushSeconds .publishTimeoutSeconds)) }}
{{- end }}
{{- end }}
{{- range $name, $as := dict "edge" .Values.edge.autoscaling "worker" .Values.worker.autoscaling }}
{{- if and (ne $as.mode "off") (gt (int64 $as.minReplicas) (int64 $as.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas (%v) is above maxReplicas (%v)" $name $as.minReplicas $as.maxReplicas) }}
{{- end }}
{{- end }}
{{- if and (ne .Values.worker.autoscaling.mode "off") (gt (int64 .Values.worker.autoscaling.maxReplicas) (int64 .Values.uplinkPartitions)) }}
{{- fail (printf "worker.autoscaling.maxReplicas (%v) is above uplinkPartitions (%v): workers beyond the partitions have no uplinks to handle" .Values.worker.autoscaling.maxReplicas .Values.uplinkPartitions) }}
{{- end }}
{{- if and .Values.worker.mqtt.existingSecret (not .Values.worker.mqtt.existingSecretKey) }}
{{- fail "worker.mqtt.existingSecretKey must name the key of MQTT_PASSWORD in worker.mqtt.existingSecret" }}
{{- end }}
{{- end }}
