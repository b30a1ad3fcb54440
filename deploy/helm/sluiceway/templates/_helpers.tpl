{{/* Names: <release>-<component>, cut to fit Kubernetes' 63 characters. */}}
{{- define "sluiceway.name" -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- end -}}

{{/* A model name as a DNS label (topic names keep the model's own spelling). */}}
{{- define "sluiceway.dns" -}}
{{- . | replace "_" "-" | replace "." "-" | lower | trunc 24 | trimSuffix "-" -}}
{{- end -}}

{{/* The consumer group of a model's workers: workers/inference/worker.py worker_group_id(). */}}
{{- define "sluiceway.workerGroup" -}}
{{- printf "%s.worker.%s" .namespace .model -}}
{{- end -}}

{{/* A model's requests and batch topics: pipeline/topics.py ModelTopics. */}}
{{- define "sluiceway.requestsTopic" -}}
{{- printf "%s.%s.requests" .namespace .model -}}
{{- end -}}
{{- define "sluiceway.batchTopic" -}}
{{- printf "%s.%s.batch" .namespace .model -}}
{{- end -}}

{{- define "sluiceway.labels" -}}
app.kubernetes.io/name: sluiceway
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "sluiceway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The settings file every process reads (SLUICEWAY_CONFIG); secrets are not in it. */}}
{{- define "sluiceway.settings" -}}
{{- $kafka := dict "bootstrap_servers" .Values.kafka.bootstrapServers "security_protocol" .Values.kafka.securityProtocol "client_id" (include "sluiceway.name" .) "replication_factor" (int .Values.kafka.replicationFactor) -}}
{{- if .Values.kafka.saslMechanism -}}
{{- $_ := set $kafka "sasl_mechanism" .Values.kafka.saslMechanism -}}
{{- $_ := set $kafka "sasl_username" .Values.kafka.saslUsername -}}
{{- end -}}
{{- if .Values.kafka.caSecret -}}
{{- $_ := set $kafka "ssl_ca_location" (printf "/etc/sluiceway/kafka-ca/%s" .Values.kafka.caKey) -}}
{{- end -}}
{{- $store := dict "endpoint" .Values.objectStore.endpoint "secure" .Values.objectStore.secure "region" .Values.objectStore.region "bucket" .Values.objectStore.bucket "access_key" .Values.objectStore.accessKey -}}
{{- $triton := dict "grpc_url" .Values.backends.triton.grpcUrl "http_url" .Values.backends.triton.httpUrl "protocol" .Values.backends.triton.protocol -}}
{{- $vllm := dict "base_url" .Values.backends.vllm.baseUrl -}}
{{- $models := dict -}}
{{- range $model, $spec := .Values.models -}}
{{- $_ := set $models $model $spec.settings -}}
{{- end -}}
{{- $own := dict "workers" (dict "metrics_port" (int .Values.metricsPort) "metrics_address" "0.0.0.0") "monitor" (dict "metrics_port" (int .Values.metricsPort) "metrics_address" "0.0.0.0" "state_dir" "/var/lib/sluiceway/faust") -}}
{{- $base := dict "namespace" .Values.topicNamespace "kafka" $kafka "object_store" $store "backends" (dict "triton" $triton "vllm" $vllm) "models" $models -}}
{{- toYaml (mustMergeOverwrite (deepCopy .Values.settings) $own $base) -}}
{{- end -}}

{{/* Environment of every Sluiceway container: the settings file and the secrets. */}}
{{- define "sluiceway.env" -}}
- name: SLUICEWAY_CONFIG
  value: /etc/sluiceway/settings/settings.yaml
- name: SLUICEWAY_OBJECT_STORE__SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ required "objectStore.secretKeySecret is required" .Values.objectStore.secretKeySecret }}
      key: {{ .Values.objectStore.secretKeyKey }}
{{- if .Values.kafka.saslMechanism }}
- name: SLUICEWAY_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.passwordSecret is required with a SASL mechanism" .Values.kafka.passwordSecret }}
      key: {{ .Values.kafka.passwordKey }}
{{- end }}
{{- if .Values.backends.vllm.apiKeySecret }}
- name: SLUICEWAY_BACKENDS__VLLM__API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.backends.vllm.apiKeySecret }}
      key: {{ .Values.backends.vllm.apiKeyKey }}
{{- end }}
{{- end -}}

{{- define "sluiceway.volumeMounts" -}}
- name: settings
  mountPath: /etc/sluiceway/settings
  readOnly: true
- name: state
  mountPath: /var/lib/sluiceway
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.caSecret }}
- name: kafka-ca
  mountPath: /etc/sluiceway/kafka-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "sluiceway.volumes" -}}
- name: settings
  configMap:
    name: {{ include "sluiceway.name" . }}-settings
- name: state
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if .Values.kafka.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.caSecret }}
{{- end }}
{{- end -}}

{{/* Pod-level pieces shared by every Sluiceway pod. */}}
{{- define "sluiceway.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
volumes:
  {{- include "sluiceway.volumes" . | nindent 2 }}
{{- end -}}

{{- define "sluiceway.podAnnotations" -}}
checksum/settings: {{ include "sluiceway.settings" . | sha256sum }}
{{- if .Values.prometheus.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* Probes on the metrics port: liveness = the loop turns, readiness = assigned and served. */}}
{{- define "sluiceway.probes" -}}
ports:
  - name: metrics
    containerPort: {{ .Values.metricsPort }}
    protocol: TCP
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 5
  failureThreshold: 24
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* A Deployment of one more Sluiceway process: .root, .component, .args, .resources, .probes */}}
{{- define "sluiceway.processDeployment" -}}
{{- $root := .root -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "sluiceway.name" $root }}-{{ .component }}
  labels:
    {{- include "sluiceway.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  replicas: 1
  # One at a time: a second monitor or runner would judge or publish twice.
  strategy: {type: Recreate}
  selector:
    matchLabels:
      app.kubernetes.io/instance: {{ $root.Release.Name }}
      app.kubernetes.io/component: {{ .component }}
  template:
    metadata:
      labels:
        {{- include "sluiceway.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
      annotations:
        {{- include "sluiceway.podAnnotations" $root | nindent 8 }}
    spec:
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      {{- include "sluiceway.podCommon" $root | trim | nindent 6 }}
      containers:
        - name: {{ .component }}
          image: {{ include "sluiceway.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: {{ toJson .args }}
          env:
            {{- include "sluiceway.env" $root | nindent 12 }}
          {{- if .probes }}
          {{- include "sluiceway.probes" $root | nindent 10 }}
          {{- end }}
          resources:
            {{- toYaml .resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "sluiceway.volumeMounts" $root | nindent 12 }}
{{- end -}}
