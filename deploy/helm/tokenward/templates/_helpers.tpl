{{/* Chart name, overridable. Truncated to 63 chars: the DNS label limit for names/labels. */}}
{{- define "tokenward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release name, plus the chart name unless the release name already contains it. */}}
{{- define "tokenward.fullname" -}}
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

{{/* Selector labels: stable for the life of a release (Deployment selectors are immutable). */}}
{{- define "tokenward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Common labels for every object. */}}
{{- define "tokenward.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tokenward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tokenward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tokenward.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tokenward.secretName" -}}
{{- if .Values.secret.create -}}
{{- include "tokenward.fullname" . -}}
{{- else -}}
{{- required "secret.existingSecret is required when secret.create is false" .Values.secret.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "tokenward.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Refuse state values that would render a broken or unsafe pod. */}}
{{- define "tokenward.checkState" -}}
{{- $t := .Values.state.type -}}
{{- if not (has $t (list "emptyDir" "pvc" "redis")) -}}
{{- fail (printf "state.type must be emptyDir, pvc or redis (got %q)" (toString $t)) -}}
{{- end -}}
{{- if and (eq $t "pvc") (gt (int .Values.replicaCount) 1) -}}
{{- fail "state.type=pvc keeps one refresh-token chain: replicaCount must be 1 (use state.type=redis for several replicas)" -}}
{{- end -}}
{{- if eq $t "redis" -}}
{{- $r := .Values.state.redis -}}
{{- if and (not $r.url) (not $r.existingSecret) -}}
{{- fail "state.type=redis needs state.redis.url (a URL without password) or state.redis.existingSecret (a Secret holding the URL under state.redis.urlKey)" -}}
{{- end -}}
{{- if and $r.url $r.existingSecret -}}
{{- fail "state.redis.url and state.redis.existingSecret are exclusive: set one" -}}
{{- end -}}
{{- if $r.url -}}
{{- if not (regexMatch "^rediss?://[^\\s\"\\\\]+$" $r.url) -}}
{{- fail "state.redis.url must be a redis:// or rediss:// URL" -}}
{{- end -}}
{{- /* The ConfigMap is readable by anyone who can read the namespace's config: no password. */ -}}
{{- if regexMatch "^rediss?://[^/@]*:[^/@]*@" $r.url -}}
{{- fail "state.redis.url holds a password, which would land in the ConfigMap: put the URL in a Secret and set state.redis.existingSecret and state.redis.urlKey" -}}
{{- end -}}
{{- end -}}
{{- if and $r.existingSecret (not $r.urlKey) -}}
{{- fail "state.redis.existingSecret needs state.redis.urlKey (the Secret key holding the URL)" -}}
{{- end -}}
{{- if regexMatch "(?m)^\\s*(redis|encryption_key)\\s*=" .Values.config -}}
{{- fail "with state.type=redis the chart writes [state] redis and encryption_key: remove them from config" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* tokenward.toml: .Values.config, plus the shared-store keys when state.type=redis. They go
     right under the existing [state] header (TOML forbids a second one), or in a new [state]
     table when config has none. The URL is written as a JSON string, which is also a valid TOML
     basic string; "$" is doubled because regexReplaceAll expands ${1}-style references. */}}
{{- define "tokenward.config" -}}
{{- if eq .Values.state.type "redis" -}}
{{- $lines := list "# state.type=redis (written by the chart): replicas share refresh-token chains" -}}
{{- with .Values.state.redis.url -}}
{{- $lines = append $lines (printf "redis = %s" (toJson .)) -}}
{{- else -}}
{{- $lines = append $lines (printf "# redis: from env TOKENWARD_STATE__REDIS (Secret %s, key %s)" .Values.state.redis.existingSecret .Values.state.redis.urlKey) -}}
{{- end -}}
{{- $lines = append $lines "encryption_key = { file = \"/var/run/secrets/tokenward/store_key\" }" -}}
{{- $block := join "\n" $lines -}}
{{- if regexMatch "(?m)^\\[state\\][ \\t]*(#.*)?$" .Values.config -}}
{{- regexReplaceAll "(?m)^(\\[state\\][ \\t]*(#.*)?)$" .Values.config (printf "${1}\n%s" (replace "$" "$$" $block)) -}}
{{- else -}}
{{- printf "%s\n\n[state]\n%s\n" (trimSuffix "\n" .Values.config) $block -}}
{{- end -}}
{{- else -}}
{{- .Values.config -}}
{{- end -}}
{{- end -}}
