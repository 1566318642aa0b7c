{{- /*
llm-sidecar injection templates: the chart's public API.

Every template takes one context dict:

    (dict "root" $ "values" <the llm-sidecar values>)

- root:   the top-level template context ($) of the chart that renders the pod, for
          .Release (names) and .Capabilities;
- values: this chart's values tree. In this chart that is .Values; in a chart that
          depends on llm-sidecar (alias llmSidecar) it is .Values.llmSidecar.

Names are derived from the release and values only, never from .Chart, so the pod a
parent chart renders and the ConfigMap/Service this chart renders agree.

Pod-level templates (each renders YAML meant for `nindent`, or nothing):

  llm-sidecar.initContainers   list items: the trust-bundle init container (intercept)
                               and, when sidecar.native, the sidecar itself
  llm-sidecar.containers       list items: the sidecar when not native (list it FIRST:
                               its postStart hook holds the app until the proxy listens)
  llm-sidecar.volumes          list items: config, tmp, audit, secrets, CA volumes
  llm-sidecar.appEnv           list items: env for the app container
  llm-sidecar.appVolumeMounts  list items: the CA trust bundle for the app (intercept)
  llm-sidecar.podLabels        map entries: llm-sidecar/instance (Service, PodMonitor)
  llm-sidecar.podAnnotations   map entries: config checksum when rolloutOnConfigChange
  llm-sidecar.terminationGracePeriodSeconds   an integer

Building blocks: llm-sidecar.fullname, .configMapName, .image, .config, .container.
*/ -}}

{{- define "llm-sidecar.appVersion" -}}0.1.0{{- end -}}

{{- define "llm-sidecar.fullname" -}}
{{- $v := .values -}}
{{- if $v.fullnameOverride -}}
{{- $v.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "llm-sidecar" .root.Release.Name -}}
{{- .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-llm-sidecar" .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llm-sidecar.configMapName" -}}
{{- printf "%s-config" (include "llm-sidecar.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-sidecar.image" -}}
{{- $img := .values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default (include "llm-sidecar.appVersion" .) $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "llm-sidecar.caDir" -}}{{ .values.intercept.mountPath }}{{- end -}}

{{- /* The sidecar config as YAML: values.config plus what the chart owns. */ -}}
{{- define "llm-sidecar.config" -}}
{{- $v := .values -}}
{{- $cfg := deepCopy ($v.config | default dict) -}}
{{- if hasKey $cfg "listen" -}}
{{- fail "config.listen is set by the chart: set sidecar.ports.proxy / sidecar.ports.admin instead" -}}
{{- end -}}
{{- $_ := set $cfg "listen" (dict "proxy" (printf "127.0.0.1:%d" (int $v.sidecar.ports.proxy)) "admin" (printf "0.0.0.0:%d" (int $v.sidecar.ports.admin))) -}}
{{- if $v.secrets.existingSecret -}}
{{- $upstreams := get $cfg "upstreams" | default dict -}}
{{- range $name, $h := $v.secrets.headers -}}
{{- if hasKey $upstreams $name -}}
{{- $u := get $upstreams $name -}}
{{- $hdrs := get $u "headers" | default dict -}}
{{- $present := false -}}
{{- range $k, $_ := $hdrs -}}
{{- if eq (lower $k) (lower $h.header) -}}{{- $present = true -}}{{- end -}}
{{- end -}}
{{- if not $present -}}
{{- $_ := set $hdrs $h.header (printf "%s${file:%s/%s}" $h.prefix $v.secrets.mountPath $h.key) -}}
{{- end -}}
{{- $_ := set $u "headers" $hdrs -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.intercept.enabled -}}
{{- if hasKey $cfg "intercept" -}}
{{- fail "config.intercept is set by the chart: use the intercept.* values instead" -}}
{{- end -}}
{{- $ca := include "llm-sidecar.caDir" . -}}
{{- $_ := set $cfg "intercept" (dict "hosts" $v.intercept.hosts "ca_cert" (printf "%s/ca.crt" $ca) "ca_key" (printf "%s/ca.key" $ca)) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{- define "llm-sidecar.validate" -}}
{{- $v := .values -}}
{{- $grace := int ($v.config.shutdown_grace_s | default 30) -}}
{{- $need := $grace -}}
{{- if not $v.sidecar.native -}}
{{- $need = add $need (int $v.sidecar.classic.preStopSleepSeconds) -}}
{{- end -}}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $need) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be >= config.shutdown_grace_s%s (%d), or the kubelet kills the sidecar mid-drain" (int $v.terminationGracePeriodSeconds) (ternary "" " + sidecar.classic.preStopSleepSeconds" $v.sidecar.native) $need) -}}
{{- end -}}
{{- if and $v.intercept.enabled (ne $v.app.mode "proxy") -}}
{{- fail "intercept.enabled needs app.mode=proxy: interception works on CONNECT tunnels through HTTPS_PROXY" -}}
{{- end -}}
{{- if and $v.intercept.enabled (not $v.intercept.secretName) -}}
{{- fail "intercept.enabled needs intercept.secretName: the Secret holding the interception CA" -}}
{{- end -}}
{{- end -}}

{{- define "llm-sidecar.probe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
periodSeconds: {{ int .p.periodSeconds }}
timeoutSeconds: {{ int .p.timeoutSeconds }}
failureThreshold: {{ int .p.failureThreshold }}
{{- end -}}

{{- /* The sidecar container (a mapping; callers add the list dash). */ -}}
{{- define "llm-sidecar.container" -}}
{{- include "llm-sidecar.validate" . -}}
{{- $v := .values -}}
{{- $s := $v.sidecar -}}
{{- $port := $s.adminPortName -}}
name: {{ $s.name }}
image: {{ include "llm-sidecar.image" . | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if $s.native }}
restartPolicy: Always
{{- end }}
args:
  - --config
  - {{ printf "%s/config.yaml" $s.configDir | quote }}
  - --log-level
  - {{ $s.logLevel | quote }}
  {{- range $s.extraArgs }}
  - {{ . | quote }}
  {{- end }}
ports:
  - name: {{ $port }}
    containerPort: {{ int $s.ports.admin }}
    protocol: TCP
env:
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  {{- with $s.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
startupProbe:
  {{- include "llm-sidecar.probe" (dict "path" "/readyz" "port" $port "p" $s.probes.startup) | nindent 2 }}
readinessProbe:
  {{- include "llm-sidecar.probe" (dict "path" "/readyz" "port" $port "p" $s.probes.readiness) | nindent 2 }}
livenessProbe:
  {{- include "llm-sidecar.probe" (dict "path" "/healthz" "port" $port "p" $s.probes.liveness) | nindent 2 }}
{{- if not $s.native }}
lifecycle:
  {{- if $s.classic.holdAppUntilReady }}
  postStart:
    exec:
      command:
        - python
        - -c
        - |
          import sys, time, urllib.request
          deadline = time.monotonic() + {{ mul (int $s.probes.startup.periodSeconds) (int $s.probes.startup.failureThreshold) }}
          while time.monotonic() < deadline:
              try:
                  urllib.request.urlopen("http://127.0.0.1:{{ int $s.ports.admin }}/readyz", timeout=1)
                  sys.exit(0)
              except Exception:
                  time.sleep(0.5)
          sys.exit(1)
  {{- end }}
  preStop:
    exec:
      command: ["sleep", "{{ int $s.classic.preStopSleepSeconds }}"]
{{- end }}
{{- with $s.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ int $s.runAsUser }}
  runAsGroup: {{ int $s.runAsGroup }}
  readOnlyRootFilesystem: true
  allowPrivilegeEscalation: false
  privileged: false
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
volumeMounts:
  - name: {{ $s.name }}-config
    mountPath: {{ $s.configDir }}
    readOnly: true
  - name: {{ $s.name }}-tmp
    mountPath: /tmp
  - name: {{ $s.name }}-audit
    mountPath: {{ $s.auditDir }}
  {{- if $v.secrets.existingSecret }}
  - name: {{ $s.name }}-secrets
    mountPath: {{ $v.secrets.mountPath }}
    readOnly: true
  {{- end }}
  {{- if $v.intercept.enabled }}
  - name: {{ $s.name }}-ca
    mountPath: {{ include "llm-sidecar.caDir" . }}
    readOnly: true
  {{- end }}
{{- end -}}

{{- define "llm-sidecar._initContainers" -}}
{{- $v := .values -}}
{{- $s := $v.sidecar -}}
{{- if and $v.intercept.enabled $v.intercept.combineSystemCAs }}
- name: {{ $s.name }}-trust
  image: {{ include "llm-sidecar.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  command:
    - /bin/sh
    - -ec
    - cat /etc/ssl/certs/ca-certificates.crt /ca/ca.crt > /trust/ca-bundle.crt && cp /ca/ca.crt /trust/ca.crt
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 32Mi
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ int $s.runAsUser }}
    runAsGroup: {{ int $s.runAsGroup }}
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: {{ $s.name }}-ca-cert
      mountPath: /ca
      readOnly: true
    - name: {{ $s.name }}-trust
      mountPath: /trust
{{- end }}
{{- if $s.native }}
- {{ include "llm-sidecar.container" . | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{- define "llm-sidecar._containers" -}}
{{- if not .values.sidecar.native }}
- {{ include "llm-sidecar.container" . | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{- define "llm-sidecar._volumes" -}}
{{- $v := .values -}}
{{- $s := $v.sidecar -}}
- name: {{ $s.name }}-config
  configMap:
    name: {{ include "llm-sidecar.configMapName" . }}
- name: {{ $s.name }}-tmp
  emptyDir:
    sizeLimit: {{ $s.tmpSizeLimit }}
- name: {{ $s.name }}-audit
  emptyDir:
    sizeLimit: {{ $s.auditSizeLimit }}
{{- if $v.secrets.existingSecret }}
- name: {{ $s.name }}-secrets
  secret:
    secretName: {{ $v.secrets.existingSecret }}
    defaultMode: {{ int $v.secrets.defaultMode }}
{{- end }}
{{- if $v.intercept.enabled }}
- name: {{ $s.name }}-ca
  secret:
    secretName: {{ $v.intercept.secretName }}
    defaultMode: {{ int $v.secrets.defaultMode }}
    items:
      - key: {{ $v.intercept.certKey }}
        path: ca.crt
      - key: {{ $v.intercept.keyKey }}
        path: ca.key
- name: {{ $s.name }}-ca-cert
  secret:
    secretName: {{ $v.intercept.secretName }}
    defaultMode: 292
    items:
      - key: {{ $v.intercept.certKey }}
        path: ca.crt
{{- if $v.intercept.combineSystemCAs }}
- name: {{ $s.name }}-trust
  emptyDir:
    sizeLimit: 4Mi
{{- end }}
{{- end }}
{{- end -}}

{{- define "llm-sidecar.noProxy" -}}
{{- $a := .values.app -}}
{{- $d := $a.clusterDomain -}}
{{- $hosts := list "localhost" "127.0.0.1" "::1" ".svc" (printf ".svc.%s" $d) (printf ".%s" $d) -}}
{{- join "," (concat $hosts $a.serviceCIDRs $a.podCIDRs $a.noProxy | uniq) -}}
{{- end -}}

{{- define "llm-sidecar._appEnv" -}}
{{- $v := .values -}}
{{- $proxy := printf "http://127.0.0.1:%d" (int $v.sidecar.ports.proxy) -}}
{{- if eq $v.app.mode "baseUrl" }}
{{- range $name, $path := $v.app.baseUrls }}
- name: {{ $name }}
  value: {{ printf "%s%s" $proxy $path | quote }}
{{- end }}
{{- else if eq $v.app.mode "proxy" }}
{{- $noProxy := include "llm-sidecar.noProxy" . }}
{{- range $name := list "HTTP_PROXY" "http_proxy" "HTTPS_PROXY" "https_proxy" }}
- name: {{ $name }}
  value: {{ $proxy | quote }}
{{- end }}
{{- range $name := list "NO_PROXY" "no_proxy" }}
- name: {{ $name }}
  value: {{ $noProxy | quote }}
{{- end }}
{{- else }}
{{- fail (printf "app.mode must be baseUrl or proxy, not %q" $v.app.mode) }}
{{- end }}
{{- if $v.intercept.enabled }}
{{- $dir := $v.intercept.trustDir }}
{{- $bundle := ternary (printf "%s/ca-bundle.crt" $dir) (printf "%s/ca.crt" $dir) $v.intercept.combineSystemCAs }}
{{- range $name := list "SSL_CERT_FILE" "REQUESTS_CA_BUNDLE" "CURL_CA_BUNDLE" }}
- name: {{ $name }}
  value: {{ $bundle | quote }}
{{- end }}
- name: NODE_EXTRA_CA_CERTS
  value: {{ printf "%s/ca.crt" $dir | quote }}
{{- end }}
{{- end -}}

{{- define "llm-sidecar._appVolumeMounts" -}}
{{- $v := .values -}}
{{- if $v.intercept.enabled }}
- name: {{ $v.sidecar.name }}-{{ ternary "trust" "ca-cert" $v.intercept.combineSystemCAs }}
  mountPath: {{ $v.intercept.trustDir }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "llm-sidecar.podLabels" -}}
llm-sidecar/instance: {{ include "llm-sidecar.fullname" . }}
{{- end -}}

{{- define "llm-sidecar._podAnnotations" -}}
{{- if .values.rolloutOnConfigChange }}
checksum/llm-sidecar-config: {{ include "llm-sidecar.config" . | sha256sum }}
{{- end }}
{{- end -}}

{{- define "llm-sidecar.terminationGracePeriodSeconds" -}}
{{- int .values.terminationGracePeriodSeconds -}}
{{- end -}}

{{- /* Public wrappers: trimmed, so `include ... | nindent N` renders no blank line. */ -}}
{{- define "llm-sidecar.initContainers" -}}{{ include "llm-sidecar._initContainers" . | trim }}{{- end -}}
{{- define "llm-sidecar.containers" -}}{{ include "llm-sidecar._containers" . | trim }}{{- end -}}
{{- define "llm-sidecar.volumes" -}}{{ include "llm-sidecar._volumes" . | trim }}{{- end -}}
{{- define "llm-sidecar.appEnv" -}}{{ include "llm-sidecar._appEnv" . | trim }}{{- end -}}
{{- define "llm-sidecar.appVolumeMounts" -}}{{ include "llm-sidecar._appVolumeMounts" . | trim }}{{- end -}}
{{- define "llm-sidecar.podAnnotations" -}}{{ include "llm-sidecar._podAnnotations" . | trim }}{{- end -}}
