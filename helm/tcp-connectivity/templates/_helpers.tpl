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
The device TLS client CA: its Secret, and whether it is a Secret apart from the
certificate's (then mounted as a second directory).
*/}}
{{- define "tcpc.edge.clientCASecretName" -}}
{{- .Values.edge.tls.clientCA.secretName | default .Values.edge.tls.secretName }}
{{- end }}
{{- define "tcpc.edge.clientCASeparate" -}}
{{- if ne (include "tcpc.edge.clientCASecretName" .) .Values.edge.tls.secretName }}true{{ end }}
{{- end }}

{{/*
The gRPC hop's security (grpcSecurity) as environment variables, for both services.
Call with (dict "ctx" $ "dir" "/mount/path"); the certificate Secret is mounted at dir.
*/}}
{{- define "tcpc.grpcSecurityEnv" -}}
{{- with .ctx.Values.grpcSecurity }}
{{- if .mtls.enabled }}
- name: GRPC_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" $.dir | quote }}
- name: GRPC_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" $.dir | quote }}
- name: GRPC_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" $.dir | quote }}
{{- end }}
{{- if .token.existingSecret }}
- name: GRPC_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .token.existingSecret }}
      key: {{ .token.key }}
{{- end }}
{{- end }}
{{- end }}

{{/*
OpenTelemetry's standard variables, when otel.endpoint is set. Call with
(dict "ctx" $ "serviceName" "edge-gateway"), after POD_NAME and POD_NAMESPACE (the
resource attributes refer to them).
*/}}
{{- define "tcpc.otelEnv" -}}
{{- with .ctx.Values.otel }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $.serviceName | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- if hasSuffix "traceidratio" .sampler }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ include "tcpc.envValue" .samplerArg }}
{{- end }}
{{- $attributes := merge (dict) .resourceAttributes (dict "k8s.namespace.name" "$(POD_NAMESPACE)" "k8s.pod.name" "$(POD_NAME)") }}
{{- $pairs := list }}
{{- range $key := keys $attributes | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (get $attributes $key)) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $pairs | quote }}
{{- range $name, $value := .config }}
- name: {{ $name }}
  value: {{ include "tcpc.envValue" $value }}
{{- end }}
{{- end }}
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
{{- with .Values.edge.tls }}
{{- if and .enabled (not .secretName) }}
{{- fail "edge.tls.secretName must name the kubernetes.io/tls Secret (tls.crt, tls.key) of the device TLS ports" }}
{{- end }}
{{- if and (not .enabled) (not .plaintext) }}
{{- fail "edge.tls.plaintext false turns the plaintext device ports off: it needs edge.tls.enabled, or the edge has no device port" }}
{{- end }}
{{- if and .clientCA.enabled (not .enabled) }}
{{- fail "edge.tls.clientCA.enabled checks client certificates on the TLS ports: it needs edge.tls.enabled" }}
{{- end }}
{{- end }}
{{- with .Values.grpcSecurity.mtls }}
{{- if and .enabled (not (and .edgeSecretName .workerSecretName)) }}
{{- fail "grpcSecurity.mtls.enabled needs grpcSecurity.mtls.edgeSecretName and workerSecretName (kubernetes.io/tls Secrets with tls.crt, tls.key and ca.crt)" }}
{{- end }}
{{- end }}
{{- end }}
