{{/* Names and labels. */}}
{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.fullname" -}}
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

{{- define "outbox-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: relay
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "outbox-relay.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Where secret and CA files appear in the containers. */}}
{{- define "outbox-relay.secretsDir" -}}/etc/outbox-relay/secrets{{- end -}}
{{- define "outbox-relay.caDir" -}}/etc/outbox-relay/ca{{- end -}}

{{- define "outbox-relay.secretName" -}}
{{- default (include "outbox-relay.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/*
The secret entries in use, as YAML {entries: [{name, key, file, env, db, value?}]}.
With secrets.existingSecret: databaseUrl always, the others when secrets.keys.<name> is set.
Otherwise (the chart's own Secret): each entry whose secrets.<name> value is set.
*/}}
{{- define "outbox-relay.secretEntries" -}}
{{- $s := .Values.secrets -}}
{{- $spec := list
  (dict "name" "databaseUrl" "file" "database-url" "env" "OUTBOX_RELAY_DATABASE_URL_FILE" "db" true)
  (dict "name" "databasePassword" "file" "database-password" "env" "OUTBOX_RELAY_DATABASE_PASSWORD_FILE" "db" true)
  (dict "name" "kafkaSaslPassword" "file" "kafka-sasl-password" "env" "OUTBOX_RELAY_KAFKA_SASL_PASSWORD_FILE" "db" false)
  (dict "name" "kafkaConfigFile" "file" "kafka.properties" "env" "OUTBOX_RELAY_KAFKA_CONFIG_FILE" "db" false) -}}
{{- $out := list -}}
{{- range $spec -}}
{{- $key := index $s.keys .name | default "" -}}
{{- if $s.existingSecret -}}
{{- if or $key (eq .name "databaseUrl") -}}
{{- $out = append $out (merge (dict "key" (default .file $key)) .) -}}
{{- end -}}
{{- else if index $s .name -}}
{{- $out = append $out (merge (dict "key" (default .file $key) "value" (index $s .name)) .) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "entries" $out) -}}
{{- end -}}

{{/* relay.shutdownTimeout ("30s", "2m") in seconds. */}}
{{- define "outbox-relay.shutdownTimeoutSeconds" -}}
{{- $t := toString .Values.relay.shutdownTimeout -}}
{{- if not (regexMatch "^[1-9][0-9]*(s|m)$" $t) -}}
{{- fail (printf "relay.shutdownTimeout %q: use whole seconds or minutes, e.g. 30s or 2m" $t) -}}
{{- end -}}
{{- $n := regexFind "^[0-9]+" $t | int -}}
{{- if hasSuffix "m" $t -}}{{ mul $n 60 }}{{- else -}}{{ $n }}{{- end -}}
{{- end -}}

{{- define "outbox-relay.terminationGracePeriodSeconds" -}}
{{- $shutdown := include "outbox-relay.shutdownTimeoutSeconds" . | int -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $shutdown 15 -}}
{{- else -}}
{{- $grace := .Values.terminationGracePeriodSeconds | int -}}
{{- if le $grace $shutdown -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be longer than relay.shutdownTimeout (%ds): the kubelet would kill the relay before it has flushed and marked its batch" $grace $shutdown) -}}
{{- end -}}
{{- $grace -}}
{{- end -}}
{{- end -}}

{{/* The port of relay.metricsAddr, which must not be a loopback address (probes, Prometheus). */}}
{{- define "outbox-relay.metricsPort" -}}
{{- $addr := .Values.relay.metricsAddr -}}
{{- if not (regexMatch "^(\\[[0-9a-fA-F:.]+\\]|[0-9.]+):[0-9]+$" $addr) -}}
{{- fail (printf "relay.metricsAddr %q: expected ip:port, e.g. 0.0.0.0:9464 or [::]:9464" $addr) -}}
{{- end -}}
{{- if or (hasPrefix "127." $addr) (hasPrefix "[::1]" $addr) -}}
{{- fail (printf "relay.metricsAddr %q is a loopback address: the kubelet's probes and Prometheus could not reach it" $addr) -}}
{{- end -}}
{{- regexFind "[0-9]+$" $addr -}}
{{- end -}}

{{/* --kafka-config entries: relay.kafkaConfig plus ssl.ca.location when a CA is mounted. */}}
{{- define "outbox-relay.kafkaConfig" -}}
{{- $props := list -}}
{{- range .Values.relay.kafkaConfig -}}
{{- $k := lower (trim (first (splitList "=" .))) -}}
{{- range list "password" "secret" "jaas" "key.pem" "private" "token" "credential" -}}
{{- if contains . $k -}}
{{- fail (printf "relay.kafkaConfig: %q looks secret and would land in a ConfigMap; put it in secrets.kafkaConfigFile (or secrets.kafkaSaslPassword)" $k) -}}
{{- end -}}
{{- end -}}
{{- $props = append $props . -}}
{{- end -}}
{{- if and (include "outbox-relay.caSource" .) .Values.caCertificate.setKafkaCaLocation -}}
{{- $props = append $props (printf "ssl.ca.location=%s/%s" (include "outbox-relay.caDir" .) .Values.caCertificate.key) -}}
{{- end -}}
{{- join ";" $props -}}
{{- end -}}

{{- define "outbox-relay.caSource" -}}
{{- $ca := .Values.caCertificate -}}
{{- if and $ca.secretName $ca.configMapName -}}
{{- fail "caCertificate: set secretName or configMapName, not both" -}}
{{- end -}}
{{- if $ca.secretName -}}secret{{- else if $ca.configMapName -}}configMap{{- end -}}
{{- end -}}

{{/* PromQL matchers for this release's relay series. */}}
{{- define "outbox-relay.promSelector" -}}
{{- default (printf "namespace=%q,job=%q" .Release.Namespace (include "outbox-relay.fullname" .)) .Values.prometheusRule.selector -}}
{{- end -}}

{{/* Volumes shared by the relay and the migrate init container. */}}
{{- define "outbox-relay.secretVolumeMounts" -}}
{{- $entries := (include "outbox-relay.secretEntries" . | fromYaml).entries -}}
{{- if $entries }}
- name: secrets
  mountPath: {{ include "outbox-relay.secretsDir" . }}
  readOnly: true
{{- end }}
{{- if include "outbox-relay.caSource" . }}
- name: ca
  mountPath: {{ include "outbox-relay.caDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* OUTBOX_RELAY_*_FILE variables; dbOnly: only the database ones (for migrate). */}}
{{- define "outbox-relay.secretFileEnv" -}}
{{- $root := .root -}}
{{- $entries := (include "outbox-relay.secretEntries" $root | fromYaml).entries -}}
{{- range $entries }}
{{- if or .db (not $.dbOnly) }}
- name: {{ .env }}
  value: {{ printf "%s/%s" (include "outbox-relay.secretsDir" $root) .file | quote }}
{{- end }}
{{- end }}
{{- end -}}
