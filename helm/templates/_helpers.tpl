{{/* Chart name, truncated to a DNS label. */}}
{{- define "wschat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<chart>", or "<release>" when it already contains the
chart name. 57 characters at most, so that suffixes such as "-redis" and
"-metrics" still fit a 63-character DNS label.
*/}}
{{- define "wschat.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 57 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 57 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "wschat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every resource of the release. */}}
{{- define "wschat.commonLabels" -}}
helm.sh/chart: {{ include "wschat.chart" . }}
app.kubernetes.io/name: {{ include "wschat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wschat
{{- end }}

{{/* Labels of the chat server's resources. */}}
{{- define "wschat.labels" -}}
{{ include "wschat.commonLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/* Selector of the chat server's pods (never changes between upgrades). */}}
{{- define "wschat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wschat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "wschat.redis.fullname" -}}
{{- printf "%s-redis" (include "wschat.fullname" .) }}
{{- end }}

{{- define "wschat.redis.labels" -}}
{{ include "wschat.commonLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "wschat.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wschat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{/* The Redis pod's labels: none that a chart or app version changes, since a changed
pod template recreates the pod and empties Redis (rooms, history, sequences). */}}
{{- define "wschat.redis.podLabels" -}}
{{ include "wschat.redis.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wschat
{{- end }}

{{- define "wschat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wschat.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wschat.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "wschat.tag" (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}
{{- end }}

{{/* An image tag as written: Helm reads an unquoted 20240101 as a float, which toString
prints as 2.0240101e+07. The schema allows whole numbers only beside strings. */}}
{{- define "wschat.tag" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ include "wschat.num" . }}{{ end }}
{{- end }}

{{/*
The Deployment's "replicas:" line. Autoscaling off: replicaCount. On: the
running Deployment's own count, read with `lookup` ("live", its manifest as
the cluster has it), or no line when there is none to read (a first install,
or offline rendering: helm template, Argo CD). A line dropped from a running
Deployment's manifest (turning the HPA on) is reset by the API server to 1,
closing every other pod's connections until the HPA scales up again; the
count the cluster already has changes nothing, and leaves the HPA in charge.
Called with (dict "root" $ "live" <the lookup's result>).
*/}}
{{- define "wschat.replicas" -}}
{{- if not .root.Values.autoscaling.enabled }}
replicas: {{ .root.Values.replicaCount }}
{{- else }}
{{- $spec := dig "spec" dict (.live | default dict) }}
{{- if hasKey $spec "replicas" }}
replicas: {{ $spec.replicas }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Where the pods keep their rooms: "redis" (REDIS_URL set: the chart's Redis, an external
one, or extraEnv.REDIS_URL) or "memory" (each pod its own).
*/}}
{{- define "wschat.store" -}}
{{- if or (ne (include "wschat.redisMode" .) "none") (hasKey .Values.extraEnv "REDIS_URL") }}redis{{ else }}memory{{ end }}
{{- end }}

{{/*
The same for the release as it runs before this upgrade, from its Deployment and
ConfigMap as `lookup` reads them: REDIS_URL in the ConfigMap, or in the wschat
container's env (from a Secret). "" when there is no Deployment to read (a first
install, or offline rendering: helm template, Argo CD).
Called with (dict "deployment" <live Deployment> "configMap" <live ConfigMap>).
*/}}
{{- define "wschat.liveStore" -}}
{{- $deployment := .deployment | default dict }}
{{- if dig "spec" "template" "spec" "containers" list $deployment }}
{{- $redis := ne (dig "data" "REDIS_URL" "" (.configMap | default dict)) "" }}
{{- range dig "spec" "template" "spec" "containers" list $deployment }}
{{- if eq (toString .name) "wschat" }}
{{- range .env | default list }}
{{- if eq (toString .name) "REDIS_URL" }}{{ $redis = true }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- ternary "redis" "memory" $redis }}
{{- end }}
{{- end }}

{{/*
The Deployment's update strategy. A rolling update runs new pods beside old ones
(minReadySeconds, the preStop sleep, the drain) and the Service sends clients to both:
safe only when both keep their rooms in one Redis. Pods without Redis are each a chat
of their own, and so are old pods on the in-memory store beside new ones on Redis (an
upgrade that turns Redis on or off): a message acknowledged on one never reaches the
members on the other. Those are replaced with Recreate, every old pod stopped (close
1001) before a new one starts; otherwise updateStrategy.
Called with (dict "root" $ "deployment" <live Deployment> "configMap" <live ConfigMap>).
*/}}
{{- define "wschat.strategy" -}}
{{- $store := include "wschat.store" .root }}
{{- $live := include "wschat.liveStore" (dict "deployment" .deployment "configMap" .configMap) }}
{{- if or (eq $store "memory") (and $live (ne $live $store)) }}
type: Recreate
{{- else }}
{{ toYaml .root.Values.updateStrategy }}
{{- end }}
{{- end }}

{{/* "true" when the release runs more than one wschat pod (now or by autoscaling). */}}
{{- define "wschat.multiPod" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
Where REDIS_URL comes from: "external" (redis.external.url or
redis.external.existingSecret), "internal" (the chart's own Redis) or "none".
*/}}
{{- define "wschat.redisMode" -}}
{{- $r := .Values.redis }}
{{- if or $r.external.url $r.external.existingSecret }}
{{- "external" }}
{{- else if eq (toString $r.enabled) "true" }}
{{- "internal" }}
{{- else if eq (toString $r.enabled) "false" }}
{{- "none" }}
{{- else if or (include "wschat.multiPod" .) (gt (int .Values.config.workers) 1) }}
{{- "internal" }}
{{- else }}
{{- "none" }}
{{- end }}
{{- end }}

{{/* gunicorn workers per pod: one without Redis. */}}
{{- define "wschat.workers" -}}
{{- if eq (include "wschat.redisMode" .) "none" }}1{{ else }}{{ int .Values.config.workers }}{{ end }}
{{- end }}

{{/* The chart's Secret carries these keys; empty when there is nothing to store. */}}
{{- define "wschat.secretData" -}}
{{- if and .Values.auth.jwtSecret (not .Values.auth.existingSecret) }}
JWT_SECRET: {{ .Values.auth.jwtSecret | b64enc | quote }}
{{- end }}
{{- if and .Values.database.url (not .Values.database.existingSecret) }}
DATABASE_URL: {{ .Values.database.url | b64enc | quote }}
{{- end }}
{{- if and .Values.redis.external.url (not .Values.redis.external.existingSecret) }}
REDIS_URL: {{ .Values.redis.external.url | b64enc | quote }}
{{- end }}
{{- if and .Values.api.key (not .Values.api.existingSecret) }}
API_KEY: {{ .Values.api.key | b64enc | quote }}
{{- end }}
{{- end }}

{{/*
Refuse values that would deploy a broken or silently split chat: every check
names the values to change.
*/}}
{{- define "wschat.validate" -}}
{{- $mode := include "wschat.redisMode" . }}
{{- if and (eq $mode "none") (include "wschat.multiPod" .) }}
{{- fail "wschat: more than one pod (replicaCount > 1 or autoscaling.enabled) needs Redis, or each pod would hold its own rooms and users would silently miss each other's messages. Set redis.enabled=auto (the chart's own Redis) or redis.external.url / redis.external.existingSecret, or use replicaCount=1 without autoscaling." }}
{{- end }}
{{- if eq (int .Values.containerPorts.http) (int .Values.containerPorts.metrics) }}
{{- fail "wschat: containerPorts.http and containerPorts.metrics must differ (PORT and METRICS_PORT): the server refuses one port for both, since it tells /metrics and /api/ from the public routes by the port a request came in on." }}
{{- end }}
{{- /* extraEnv overrides the ConfigMap's PORT and METRICS_PORT (wschat.env), but the
probes, the Services, the ServiceMonitor and the scrape annotations all follow
containerPorts: a port set only in extraEnv would be one nothing probes or scrapes. */}}
{{- range $var, $key := dict "PORT" "http" "METRICS_PORT" "metrics" }}
{{- if hasKey $.Values.extraEnv $var }}
{{- $given := include "wschat.envValue" (index $.Values.extraEnv $var) | trim }}
{{- $port := include "wschat.num" (index $.Values.containerPorts $key) }}
{{- if ne $given $port }}
{{- fail (printf "wschat: extraEnv.%s (%s) differs from containerPorts.%s (%s): the probes, the Services, the ServiceMonitor and the scrape annotations use containerPorts.%s, so the server would listen where nothing probes or scrapes it. Set containerPorts.%s instead (the chart sets %s from it) and drop extraEnv.%s." $var $given $key $port $key $key $var $var) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* GRACEFUL_TIMEOUT as the pods get it: extraEnv overrides config (wschat.env). */}}
{{- $gracefulName := "config.gracefulTimeout" }}
{{- $graceful := float64 .Values.config.gracefulTimeout }}
{{- if hasKey .Values.extraEnv "GRACEFUL_TIMEOUT" }}
{{- $gracefulName = "extraEnv.GRACEFUL_TIMEOUT" }}
{{- $graceful = float64 (index .Values.extraEnv "GRACEFUL_TIMEOUT") }}
{{- end }}
{{- $grace := int .Values.terminationGracePeriodSeconds }}
{{- $needed := add (int .Values.lifecycle.preStopSleepSeconds) (int (ceil $graceful)) }}
{{- if le $grace (int $needed) }}
{{- fail (printf "wschat: terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + %s (%d), or Kubernetes kills the pod before every client got close 1001." $grace $gracefulName (int $needed)) }}
{{- end }}
{{- if and .Values.auth.required (not (or .Values.auth.jwtSecret .Values.auth.existingSecret .Values.auth.publicKey .Values.auth.jwksUrl)) }}
{{- fail "wschat: auth.required needs auth.jwtSecret, auth.existingSecret, auth.publicKey or auth.jwksUrl." }}
{{- end }}
{{- $a := .Values.auth }}
{{- $keySources := compact (list (or $a.jwtSecret $a.existingSecret) $a.publicKey $a.jwksUrl) }}
{{- if gt (len $keySources) 1 }}
{{- fail "wschat: set only one of auth.jwtSecret (or auth.existingSecret), auth.publicKey and auth.jwksUrl: the server verifies tokens with keys from exactly one source, and refuses to start with more (JWT_SECRET, JWT_PUBLIC_KEY, JWT_JWKS_URL)." }}
{{- end }}
{{- if and .Values.config.enablePersistence (not (or .Values.database.url .Values.database.existingSecret)) }}
{{- fail "wschat: config.enablePersistence needs database.url or database.existingSecret (postgresql://..., or sqlite:////path on a volume from extraVolumes): the root filesystem is read-only and a pod's disk does not outlive it." }}
{{- end }}
{{- if and .Values.config.enablePersistence (hasPrefix "sqlite:" (toString .Values.database.url)) (include "wschat.multiPod" .) }}
{{- fail "wschat: SQLite (database.url sqlite:...) serves one pod only: several pods (replicaCount > 1 or autoscaling.enabled) would each keep their own file, or wait for one ReadWriteOnce volume, and a room's stored history would depend on the pod a client reached. Use PostgreSQL (database.url postgresql://...) for several pods, or replicaCount=1 without autoscaling." }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.connectionsPerPod.enabled) }}
{{- fail "wschat: autoscaling.enabled needs a metric: autoscaling.targetCPUUtilizationPercentage and/or autoscaling.connectionsPerPod.enabled." }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if $pdb.enabled }}
{{- $pods := ternary (int .Values.autoscaling.minReplicas) (int .Values.replicaCount) (not (not .Values.autoscaling.enabled)) }}
{{- $min := toString $pdb.minAvailable }}
{{- $max := toString $pdb.maxUnavailable }}
{{- $blocks := false }}
{{- if ne $min "" }}
{{- if hasSuffix "%" $min }}
{{- /* Kubernetes rounds minAvailable up: ceil(p * pods / 100) >= pods. */}}
{{- $blocks = gt (mul (int (trimSuffix "%" $min)) $pods) (mul 100 (sub $pods 1)) }}
{{- else }}
{{- $blocks = ge (int $min) $pods }}
{{- end }}
{{- else }}
{{- /* maxUnavailable rounds up too: only 0 (or 0%) lets no pod go. */}}
{{- $blocks = eq (int (trimSuffix "%" $max)) 0 }}
{{- end }}
{{- if $blocks }}
{{- fail (printf "wschat: podDisruptionBudget lets none of the %d pods (replicaCount, or autoscaling.minReplicas) go (minAvailable %q, maxUnavailable %q): every node drain would wait forever. Lower podDisruptionBudget.minAvailable below the pod count, or set podDisruptionBudget.maxUnavailable to 1 or more." $pods $min $max) }}
{{- end }}
{{- end }}
{{- $res := .Values.resources | default dict }}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.targetCPUUtilizationPercentage (not (or (dig "requests" "cpu" "" $res) (dig "limits" "cpu" "" $res))) }}
{{- fail "wschat: autoscaling.targetCPUUtilizationPercentage is a share of resources.requests.cpu, which is not set: the HPA would report \"missing request for cpu\" and never scale. Set resources.requests.cpu (500m by default), or scale on connections only (autoscaling.targetCPUUtilizationPercentage=null with autoscaling.connectionsPerPod.enabled=true)." }}
{{- end }}
{{- $perPod := .Values.autoscaling.connectionsPerPod }}
{{- if and .Values.autoscaling.enabled $perPod.enabled }}
{{- /* A pod holds at most MAX_CONNECTIONS (as the pods get it: extraEnv overrides config),
so the average the HPA reads never reaches a target at or above it. */}}
{{- $target := include "wschat.quantityBytes" $perPod.averageValue }}
{{- $limit := include "wschat.maxConnections" . }}
{{- if and $target (ge (float64 $target) (float64 $limit)) }}
{{- fail (printf "wschat: autoscaling.connectionsPerPod.averageValue (%v) must be below MAX_CONNECTIONS (%s: config.maxConnections, or extraEnv.MAX_CONNECTIONS): a pod holds at most that many connections and refuses the rest with 503, so the average per pod never passes the target and the HPA never adds a pod for connections. Lower the target (half of MAX_CONNECTIONS by default) or raise config.maxConnections." $perPod.averageValue $limit) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "wschat: autoscaling.maxReplicas must be at least autoscaling.minReplicas." }}
{{- end }}
{{- if .Values.ingress.enabled }}
{{- /* ingress-nginx closes a proxied WebSocket that carried nothing for proxy-read-timeout
seconds: on an upgraded connection that is the one timer it keeps, re-armed by traffic either
way. An idle client's connection carries only the server's ping (and its pong), once every
HEARTBEAT_INTERVAL and up to 1 s late (the server's heartbeat timer runs at least once a second), so
the timeout must be more than that, or every idle client is cut off and reconnects. The
values in effect: extraEnv overrides config (wschat.env), ingress.annotations override
websocketTimeoutSeconds (ingress.yaml). */}}
{{- $hbName := "config.heartbeatInterval" }}
{{- $hb := float64 .Values.config.heartbeatInterval }}
{{- if hasKey .Values.extraEnv "HEARTBEAT_INTERVAL" }}
{{- $hbName = "extraEnv.HEARTBEAT_INTERVAL" }}
{{- $hb = float64 (index .Values.extraEnv "HEARTBEAT_INTERVAL") }}
{{- end }}
{{- $readTimeout := "nginx.ingress.kubernetes.io/proxy-read-timeout" }}
{{- $toName := "ingress.websocketTimeoutSeconds" }}
{{- $to := float64 .Values.ingress.websocketTimeoutSeconds }}
{{- $override := toString (index (.Values.ingress.annotations | default dict) $readTimeout | default "") }}
{{- if regexMatch "^[0-9]+$" $override }}
{{- $toName = printf "ingress.annotations.%s" $readTimeout }}
{{- $to = float64 $override }}
{{- end }}
{{- if le $to (addf $hb 1) }}
{{- fail (printf "wschat: %s (%v) must be more than %s (%v) + 1 second: ingress-nginx closes a WebSocket that carried nothing for that many seconds (proxy-read-timeout), and an idle client's connection carries only the server's ping, once every HEARTBEAT_INTERVAL seconds and up to 1 s late, so healthy idle clients would be cut off and reconnect again and again. Raise %s (3600 by default) or lower %s." $toName $to $hbName $hb $toName $hbName) }}
{{- end }}
{{- end }}
{{- if eq $mode "internal" }}
{{- /* The chart's Redis: maxmemory must leave a quarter of the container's memory limit
to Redis itself (client output buffers, pub/sub backlogs, allocator fragmentation, none
of which maxmemory counts, or counts in full). At or near the limit the kernel OOM-kills
Redis before maxmemory refuses a write, and it comes back empty. The last --maxmemory of
redis.extraArgs is the one redis-server keeps. */}}
{{- $r := .Values.redis }}
{{- $maxName := "redis.maxmemory" }}
{{- $max := toString $r.maxmemory }}
{{- range $i, $arg := $r.extraArgs }}
{{- if and (eq (toString $arg) "--maxmemory") (lt (add1 $i) (len $r.extraArgs)) }}
{{- $maxName = "redis.extraArgs --maxmemory" }}
{{- $max = toString (index $r.extraArgs (add1 $i)) }}
{{- end }}
{{- end }}
{{- $limit := dig "limits" "memory" "" ($r.resources | default dict) }}
{{- $limitBytes := include "wschat.quantityBytes" $limit }}
{{- $maxBytes := include "wschat.redisBytes" $max }}
{{- if and $limit $limitBytes $maxBytes }}
{{- $allowed := printf "%.0f" (floor (mulf (float64 $limitBytes) 0.75)) }}
{{- if eq (float64 $maxBytes) 0.0 }}
{{- fail (printf "wschat: %s is 0, no limit at all: the chart's Redis would grow until the kernel OOM-kills it at redis.resources.limits.memory (%s), and it comes back empty (rooms, history, message sequences; docs/delivery.md). Set %s to at most 75%% of the limit (%s bytes, e.g. %dmb), or raise redis.resources.limits.memory." $maxName (toString $limit) $maxName $allowed (int (div (int64 $allowed) 1048576))) }}
{{- else if gt (float64 $maxBytes) (float64 $allowed) }}
{{- fail (printf "wschat: %s (%s, %s bytes) must be at most 75%% of redis.resources.limits.memory (%s, %s bytes), that is %s bytes (e.g. %dmb): Redis needs the rest for itself (client and pub/sub buffers, fragmentation), and nearer the limit the kernel OOM-kills the chart's Redis before maxmemory refuses a write; it comes back empty (rooms, history, message sequences; docs/delivery.md). Lower %s or raise redis.resources.limits.memory." $maxName $max $maxBytes (toString $limit) $limitBytes $allowed (int (div (int64 $allowed) 1048576)) $maxName) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Bytes of a Kubernetes quantity as resources.limits.memory takes it: a number, or a
string such as 512Mi, 1.5Gi, 400M, 4e8, 402653184 (binary suffixes Ki..Ei, decimal k..E,
m for thousandths, or a decimal exponent). Printed whole; "" when it is none of those.
*/}}
{{- define "wschat.quantityBytes" -}}
{{- $q := . }}
{{- if or (kindIs "float64" $q) (kindIs "int64" $q) (kindIs "int" $q) }}
{{- printf "%.0f" (float64 $q) }}
{{- else }}
{{- $s := toString $q | trim }}
{{- $pattern := "^([0-9]+(?:\\.[0-9]*)?|\\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$" }}
{{- if regexMatch $pattern $s }}
{{- $n := float64 (regexReplaceAll $pattern $s "${1}") }}
{{- $suffix := regexReplaceAll $pattern $s "${2}" }}
{{- $units := dict "" 1.0 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0
      "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12
      "P" 1e15 "E" 1e18 }}
{{- if eq $suffix "m" }}
{{- $n = divf $n 1000 }}
{{- else if hasKey $units $suffix }}
{{- $n = mulf $n (get $units $suffix) }}
{{- else }}
{{- $exp := int (trimPrefix "+" (substr 1 -1 $suffix)) }}
{{- /* At most 10^±40: a limit beyond that is no limit to check against. */}}
{{- range until (int (min 40 (max $exp (mul -1 $exp)))) }}
{{- $n = ternary (mulf $n 10) (divf $n 10) (gt $exp 0) }}
{{- end }}
{{- end }}
{{- printf "%.0f" $n }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Bytes of a Redis memory size as redis-server reads it (maxmemory): digits with no unit
or b (bytes), k (1000), kb (1024), m, mb, g, gb, in any case. "" when it is not one.
*/}}
{{- define "wschat.redisBytes" -}}
{{- $s := toString . | trim | lower }}
{{- $pattern := "^([0-9]+)(b|k|kb|m|mb|g|gb)?$" }}
{{- if regexMatch $pattern $s }}
{{- $units := dict "" 1.0 "b" 1.0 "k" 1e3 "kb" 1024.0 "m" 1e6 "mb" 1048576.0 "g" 1e9
      "gb" 1073741824.0 }}
{{- printf "%.0f" (mulf (float64 (regexReplaceAll $pattern $s "${1}")) (get $units (regexReplaceAll $pattern $s "${2}"))) }}
{{- end }}
{{- end }}

{{/*
The one rule for everything that serves the Prometheus Operator: "true" always,
"auto" when the cluster serves monitoring.coreos.com/v1 <kind> (the operator's
CRDs), "false" never. Called with (list <enabled value> . <kind>).
*/}}
{{- define "wschat.monitoringEnabled" -}}
{{- $e := toString (index . 0) }}
{{- $ctx := index . 1 }}
{{- if eq $e "true" }}true
{{- else if and (eq $e "auto") ($ctx.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" (index . 2))) }}true
{{- end }}
{{- end }}

{{/*
A Prometheus duration of the forms the schema allows (1h, 1m30s, 500ms) in
milliseconds.
*/}}
{{- define "wschat.durationMs" -}}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|h|m|s)" (toString .) -1 }}
{{- if hasSuffix "ms" . }}{{ $total = add $total (trimSuffix "ms" . | int) }}
{{- else if hasSuffix "h" . }}{{ $total = add $total (mul (trimSuffix "h" . | int) 3600000) }}
{{- else if hasSuffix "m" . }}{{ $total = add $total (mul (trimSuffix "m" . | int) 60000) }}
{{- else }}{{ $total = add $total (mul (trimSuffix "s" . | int) 1000) }}
{{- end }}
{{- end }}
{{- $total }}
{{- end }}

{{/* Whether to render the ServiceMonitor. */}}
{{- define "wschat.serviceMonitorEnabled" -}}
{{- include "wschat.monitoringEnabled" (list .Values.serviceMonitor.enabled . "ServiceMonitor") }}
{{- end }}

{{/* Whether to render the PrometheusRule (same rule as the ServiceMonitor). */}}
{{- define "wschat.prometheusRuleEnabled" -}}
{{- include "wschat.monitoringEnabled" (list .Values.prometheusRule.enabled . "PrometheusRule") }}
{{- end }}

{{/* Whether to render the Grafana dashboard ConfigMap: "auto" when metrics are scraped. */}}
{{- define "wschat.grafanaDashboardEnabled" -}}
{{- include "wschat.monitoringEnabled" (list .Values.grafanaDashboard.enabled . "ServiceMonitor") }}
{{- end }}

{{/* MAX_CONNECTIONS as the pods get it (extraEnv overrides config). */}}
{{- define "wschat.maxConnections" -}}
{{- if hasKey .Values.extraEnv "MAX_CONNECTIONS" }}{{ include "wschat.envValue" (index .Values.extraEnv "MAX_CONNECTIONS") }}
{{- else }}{{ include "wschat.num" .Values.config.maxConnections }}{{ end }}
{{- end }}

{{/* An extraEnv value as the server reads it: a string as it is, a number as
wschat.num writes it (Helm reads 134217728 as a float, which toString prints as
1.34217728e+08), true and false in lower case. */}}
{{- define "wschat.envValue" -}}
{{- if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) }}{{ include "wschat.num" . }}
{{- else }}{{ toString . }}{{ end }}
{{- end }}

{{/*
A number as the server parses it: whole numbers without exponent or decimals
(values arrive as float64 or json.Number depending on their source).
*/}}
{{- define "wschat.num" -}}
{{- $v := . }}
{{- if eq (float64 (int64 $v)) (float64 $v) }}{{ int64 $v }}{{ else }}{{ float64 $v }}{{ end }}
{{- end }}

{{/* The server's environment, minus credentials: the ConfigMap's data. */}}
{{- define "wschat.env" -}}
{{- $c := .Values.config }}
{{- $a := .Values.auth }}
{{- $env := dict
  "HOST" "0.0.0.0"
  "PORT" (include "wschat.num" .Values.containerPorts.http)
  "METRICS_PORT" (include "wschat.num" .Values.containerPorts.metrics)
  "WEB_CONCURRENCY" (include "wschat.workers" .)
  "MAX_CONNECTIONS" (include "wschat.num" $c.maxConnections)
  "MAX_CONNECTIONS_PER_IP" (include "wschat.num" $c.maxConnectionsPerIp)
  "MAX_HANDSHAKES_PER_IP" (include "wschat.num" $c.maxHandshakesPerIp)
  "MAX_CONNECTIONS_PER_USER" (include "wschat.num" $c.maxConnectionsPerUser)
  "RATE_LIMIT" (include "wschat.num" $c.rateLimit)
  "RATE_LIMIT_BURST" (include "wschat.num" $c.rateLimitBurst)
  "HEARTBEAT_INTERVAL" (include "wschat.num" $c.heartbeatInterval)
  "HISTORY_SIZE" (include "wschat.num" $c.historySize)
  "MAX_MESSAGE_BYTES" (include "wschat.num" $c.maxMessageBytes)
  "MAX_OUTBOUND_BYTES" (include "wschat.num" $c.maxOutboundBytes)
  "PRESENCE_TTL" (include "wschat.num" $c.presenceTtl)
  "LOG_FORMAT" $c.logFormat
  "LOG_LEVEL" $c.logLevel
  "GRACEFUL_TIMEOUT" (include "wschat.num" $c.gracefulTimeout)
  "ENABLE_PERSISTENCE" (toString $c.enablePersistence)
  "AUTH_REQUIRED" (toString $a.required)
  "JWT_LEEWAY" (include "wschat.num" $a.leeway)
}}
{{- with $c.allowedOrigins }}{{ $_ := set $env "ALLOWED_ORIGINS" (join "," .) }}{{ end }}
{{- $_ := set $env "GUEST_ROOMS" (join "," $c.guestRooms) }}
{{- with $c.privateRooms }}{{ $_ := set $env "PRIVATE_ROOMS" (join "," .) }}{{ end }}
{{- with $a.publicKey }}{{ $_ := set $env "JWT_PUBLIC_KEY" . }}{{ end }}
{{- with $a.jwksUrl }}{{ $_ := set $env "JWT_JWKS_URL" . }}{{ end }}
{{- with $a.algorithms }}{{ $_ := set $env "JWT_ALGORITHMS" (join "," .) }}{{ end }}
{{- with $a.audience }}{{ $_ := set $env "JWT_AUDIENCE" . }}{{ end }}
{{- with $a.issuer }}{{ $_ := set $env "JWT_ISSUER" . }}{{ end }}
{{- if eq (include "wschat.redisMode" .) "internal" }}
{{- $_ := set $env "REDIS_URL" (printf "redis://%s:6379/0" (include "wschat.redis.fullname" .)) }}
{{- end }}
{{- range $k, $v := .Values.extraEnv }}{{ $_ := set $env $k (include "wschat.envValue" $v) }}{{ end }}
{{- range $k := keys $env | sortAlpha }}
{{ $k }}: {{ get $env $k | quote }}
{{- end }}
{{- end }}
