#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, built from Go modules (no containers, no kubelet).
#
#   bash scripts/cluster.sh build   build the binaries once per machine (cached by versions):
#                                   etcd, kube-*, kubectl, helm and prometheus (with kubernetes_sd)
#   bash scripts/cluster.sh up      start etcd, kube-apiserver, kube-controller-manager and
#                                   kube-scheduler (or reuse a running plane); prints the admin
#                                   kubeconfig path
#   bash scripts/cluster.sh down    stop every process `up` started, by PID
#   bash scripts/cluster.sh env     print `export` lines (KUBECONFIG, PATH, HELIOS_CLUSTER_*)
#   bash scripts/cluster.sh status  say whether the plane runs and which PIDs it has
#   bash scripts/cluster.sh crds    print where the other projects' CRDs the suite installs are cached
#
# The binaries live in ~/.cache/helios/cluster/<versions>/bin (HELIOS_CLUSTER_CACHE moves it), so
# a clean clone on the same machine reuses them. The running plane's state (certificates, keys,
# etcd data, logs, PIDs, the audit log) lives in .helios/cluster in the repository (HELIOS_CLUSTER_DIR
# moves it). What is real and what stands in: docs/cluster-testing.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_VERSION="v1.37.2"
ETCD_VERSION="v3.6.16"
HELM_VERSION="v3.22.0"
PROMETHEUS_VERSION="v3.16.0" # module github.com/prometheus/prometheus v0.316.0
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_prometheus-${PROMETHEUS_VERSION}"
CACHE="${HELIOS_CLUSTER_CACHE:-${HOME}/.cache/helios/cluster}/${KEY}"
BIN="${CACHE}/bin"
STATE="${HELIOS_CLUSTER_DIR:-${ROOT}/.helios/cluster}"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm prometheus)
# Other projects' CRDs the suite installs, as those projects publish them (from their Go modules).
INFERENCE_EXTENSION_VERSION="v1.2.0" # sigs.k8s.io/gateway-api-inference-extension: InferencePool v1
CRDS="${CACHE}/crds"

# Loopback ports; override when another plane already holds them.
ETCD_CLIENT_PORT="${HELIOS_ETCD_PORT:-32379}"
ETCD_PEER_PORT="${HELIOS_ETCD_PEER_PORT:-32380}"
APISERVER_PORT="${HELIOS_APISERVER_PORT:-36443}"
KCM_PORT="${HELIOS_KCM_PORT:-30257}"
SCHEDULER_PORT="${HELIOS_SCHEDULER_PORT:-30259}"
SERVICE_CIDR="10.96.0.0/16"
CLUSTER_CIDR="10.244.0.0/16"

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

built() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "${BIN}/${b}" ]] || return 1; done
}

go_ok() {
  command -v go >/dev/null 2>&1 || return 1
  local v
  v="$(go env GOVERSION 2>/dev/null | sed 's/^go//')"
  [[ "$(printf '%s\n%s\n' 1.25 "${v}" | sort -V | head -1)" == "1.25" ]]
}

# go build, nicely: these machines have two cores shared with other work.
gobuild() {
  local dir="$1" out="$2" pkg="$3" ldflags="$4"
  log "building ${out##*/} from ${pkg}"
  (cd "${ROOT}/cluster/${dir}" &&
    CGO_ENABLED=0 nice -n 10 go build -p "${HELIOS_BUILD_JOBS:-2}" -trimpath -tags "${HELIOS_BUILD_TAGS:-}" \
      -ldflags="-s -w ${ldflags}" -o "${out}.tmp" "${pkg}")
  mv "${out}.tmp" "${out}"
}

# The Gateway API Inference Extension's InferencePool CRD, from its Go module (cached beside the binaries).
fetch_crds() {
  local out="${CRDS}/inferencepools.yaml" dir
  [[ -s "${out}" ]] && return 0
  mkdir -p "${CRDS}"
  dir="$(cd /tmp && go mod download -json "sigs.k8s.io/gateway-api-inference-extension@${INFERENCE_EXTENSION_VERSION}" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -n "${dir}" ]] || die "could not fetch the InferencePool CRD (gateway-api-inference-extension ${INFERENCE_EXTENSION_VERSION})"
  cp "${dir}/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml" "${out}.tmp"
  mv "${out}.tmp" "${out}"
}

cmd_build() {
  go_ok && fetch_crds
  if built; then
    log "binaries cached in ${BIN}"
    return 0
  fi
  go_ok || die "Go >= 1.25 is needed to build the control plane (found: $(go version 2>/dev/null || echo none))"
  mkdir -p "${BIN}"
  local start=$SECONDS minor="${K8S_VERSION#v1.}" kv=""
  minor="${minor%%.*}"
  local k
  for k in client-go/pkg/version component-base/version; do
    kv+=" -X k8s.io/${k}.gitVersion=${K8S_VERSION} -X k8s.io/${k}.gitMajor=1"
    kv+=" -X k8s.io/${k}.gitMinor=${minor} -X k8s.io/${k}.gitTreeState=clean"
    kv+=" -X k8s.io/${k}.buildDate=1970-01-01T00:00:00Z"
  done
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [[ -x "${BIN}/${b}" ]] || gobuild kube "${BIN}/${b}" "k8s.io/kubernetes/cmd/${b}" "${kv}"
  done
  [[ -x "${BIN}/etcd" ]] || gobuild etcd "${BIN}/etcd" . ""
  if [[ ! -x "${BIN}/helm" ]]; then
    local hmin
    hmin="$(sed -n 's/^\s*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "${ROOT}/cluster/helm/go.mod")"
    gobuild helm "${BIN}/helm" helm.sh/helm/v3/cmd/helm \
      "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${hmin} -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${hmin}"
  fi
  # Debian's prometheus leaves kubernetes_sd_configs out; this one has only that discovery.
  if [[ ! -x "${BIN}/prometheus" ]]; then
    HELIOS_BUILD_TAGS="remove_all_sd,enable_kubernetes_sd" gobuild prometheus "${BIN}/prometheus" \
      github.com/prometheus/prometheus/cmd/prometheus \
      "-X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v} -X github.com/prometheus/common/version.Branch=HEAD"
  fi
  log "built in $((SECONDS - start)) s into ${BIN}"
}

# ---------------------------------------------------------------------------------------------
# Certificates and kubeconfigs (openssl; regenerated for every fresh plane)

pki() { printf '%s/pki/%s' "${STATE}" "$1"; }

# sign NAME SUBJECT [SAN]: a key and a certificate signed by the plane's CA.
sign() {
  local name="$1" subject="$2" san="${3:-}" ext
  ext="$(pki "${name}.ext")"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' >"${ext}"
  if [[ -n "${san}" ]]; then
    printf 'extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "${san}" >>"${ext}"
  else
    printf 'extendedKeyUsage=clientAuth\n' >>"${ext}"
  fi
  openssl req -new -newkey rsa:2048 -nodes -keyout "$(pki "${name}.key")" -subj "${subject}" \
    -out "$(pki "${name}.csr")" 2>/dev/null
  openssl x509 -req -in "$(pki "${name}.csr")" -CA "$(pki ca.crt)" -CAkey "$(pki ca.key)" \
    -CAcreateserial -days 30 -sha256 -extfile "${ext}" -out "$(pki "${name}.crt")" 2>/dev/null
  rm -f "$(pki "${name}.csr")" "${ext}"
}

# kubeconfig FILE CERT-NAME: a kubeconfig for the loopback API server with that client certificate.
kubeconfig() {
  local file="$1" name="$2"
  cat >"${file}" <<YAML
apiVersion: v1
kind: Config
clusters:
  - name: helios
    cluster:
      server: https://127.0.0.1:${APISERVER_PORT}
      certificate-authority-data: $(base64 -w0 <"$(pki ca.crt)")
users:
  - name: ${name}
    user:
      client-certificate-data: $(base64 -w0 <"$(pki "${name}.crt")")
      client-key-data: $(base64 -w0 <"$(pki "${name}.key")")
contexts:
  - name: helios
    context: {cluster: helios, user: ${name}, namespace: default}
current-context: helios
YAML
  chmod 600 "${file}"
}

make_pki() {
  mkdir -p "${STATE}/pki"
  chmod 700 "${STATE}/pki"
  openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$(pki ca.key)" -out "$(pki ca.crt)" \
    -days 30 -subj "/CN=helios-cluster-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  sign apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  sign apiserver-kubelet-client "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client"
  sign admin "/O=system:masters/CN=kubernetes-admin"
  sign kube-controller-manager "/CN=system:kube-controller-manager"
  sign kube-scheduler "/CN=system:kube-scheduler"
  # The service-account signing key: tokens of `kubectl create token` are signed with it.
  openssl genrsa -out "$(pki sa.key)" 2048 2>/dev/null
  openssl rsa -in "$(pki sa.key)" -pubout -out "$(pki sa.pub)" 2>/dev/null
  kubeconfig "${STATE}/kubeconfig" admin
  kubeconfig "${STATE}/kube-controller-manager.kubeconfig" kube-controller-manager
  kubeconfig "${STATE}/kube-scheduler.kubeconfig" kube-scheduler
}

# A node's own credentials (user system:node:NAME in group system:nodes), so the Node authorizer
# and NodeRestriction judge the test kubelet as they judge a real one.
cmd_node_kubeconfig() {
  local node="${1:?usage: cluster.sh node-kubeconfig NODE-NAME}"
  [[ -f "$(pki ca.key)" ]] || die "no plane: run \`cluster.sh up\` first"
  mkdir -p "${STATE}/nodes"
  if [[ ! -f "${STATE}/nodes/${node}.kubeconfig" ]]; then
    sign "node-${node}" "/O=system:nodes/CN=system:node:${node}"
    kubeconfig "${STATE}/nodes/${node}.kubeconfig" "node-${node}"
  fi
  printf '%s\n' "${STATE}/nodes/${node}.kubeconfig"
}

# ---------------------------------------------------------------------------------------------
# Processes

pidfile() { printf '%s/pids/%s.pid' "${STATE}" "$1"; }

alive() {
  local f
  f="$(pidfile "$1")"
  [[ -f "${f}" ]] && kill -0 "$(cat "${f}")" 2>/dev/null
}

start() {
  local name="$1"
  shift
  mkdir -p "${STATE}/pids" "${STATE}/logs"
  # setsid: the plane outlives the shell (and the pytest session) that started it.
  setsid "$@" >"${STATE}/logs/${name}.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "${name}")"
}

# wait_for WHAT SECONDS COMMAND...: poll until the command succeeds, or fail with the log's tail.
wait_for() {
  local what="$1" limit="$2" t=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((t >= limit * 5)); then
      log "${what} did not become ready in ${limit} s; last lines of its log:"
      tail -n 30 "${STATE}/logs/${what}.log" >&2 || true
      return 1
    fi
    if ! alive "${what}"; then
      log "${what} exited; last lines of its log:"
      tail -n 30 "${STATE}/logs/${what}.log" >&2 || true
      return 1
    fi
    sleep 0.2
    t=$((t + 1))
  done
}

apiserver_ready() {
  curl -sf --cacert "$(pki ca.crt)" --cert "$(pki admin.crt)" --key "$(pki admin.key)" \
    "https://127.0.0.1:${APISERVER_PORT}/readyz" >/dev/null
}

running() {
  local b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler; do alive "${b}" || return 1; done
  apiserver_ready
}

audit_policy() {
  cat >"${STATE}/audit-policy.yaml" <<'YAML'
# Every request at Metadata level (who, verb, resource, subresource, response code), so the tests
# can compare what the operator's ServiceAccount really did with what the chart grants it.
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    nonResourceURLs: ["/healthz*", "/readyz*", "/livez*", "/version"]
  - level: Metadata
YAML
}

# Pod addresses. The API server refuses loopback addresses in EndpointSlices (and as its own
# advertised address), so the test kubelet's pods get addresses from the pod CIDR, which a `local`
# route on lo makes this machine's own (as 127.0.0.0/8 is): any of them can be bound and reached
# here, and nowhere else. Adding the route needs root (CAP_NET_ADMIN); without it pods fall back to
# 127.0.N.x and the EndpointSlice tests say why they skip. `down` removes the route it added.
pod_route() {
  ip route show table local "${CLUSTER_CIDR}" 2>/dev/null | grep -q .
}

add_pod_route() {
  if pod_route; then
    printf '%s\n' "${CLUSTER_CIDR%.0.0/16}" >"${STATE}/pod-prefix"
  elif ip route add local "${CLUSTER_CIDR}" dev lo table local 2>/dev/null; then
    printf '%s\n' "${CLUSTER_CIDR%.0.0/16}" >"${STATE}/pod-prefix"
    touch "${STATE}/pod-route-added"
    log "pod addresses: ${CLUSTER_CIDR} routed locally on lo"
  else
    printf '127.0\n' >"${STATE}/pod-prefix"
    log "pod addresses: 127.0.N.x (cannot route ${CLUSTER_CIDR} on lo without CAP_NET_ADMIN; EndpointSlices refuse loopback)"
  fi
}

cmd_up() {
  if running; then
    log "reusing the running plane (state in ${STATE})"
    printf '%s\n' "${STATE}/kubeconfig"
    return 0
  fi
  cmd_build
  cmd_down >/dev/null 2>&1 || true
  local t0=$SECONDS
  rm -rf "${STATE}"
  mkdir -p "${STATE}/logs" "${STATE}/pids"
  make_pki
  audit_policy
  add_pod_route

  start etcd "${BIN}/etcd" --name helios --data-dir "${STATE}/etcd" \
    --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster "helios=http://127.0.0.1:${ETCD_PEER_PORT}" \
    --unsafe-no-fsync --quota-backend-bytes 1073741824 --log-level warn
  wait_for etcd 30 curl -sf "http://127.0.0.1:${ETCD_CLIENT_PORT}/health"

  # No endpoint reconciler: it refuses a loopback advertise address (in-cluster clients of the
  # `kubernetes` Service are not run here; clients use the kubeconfig's loopback address).
  # The default admission plugins are on unless disabled; OwnerReferencesPermissionEnforcement and
  # NodeRestriction are added: the first is what hardened clusters run (blockOwnerDeletion needs
  # `update` on the owner's finalizers), the second judges the test kubelet as a real kubelet.
  start kube-apiserver "${BIN}/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:${ETCD_CLIENT_PORT}" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "${APISERVER_PORT}" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$(pki apiserver.crt)" --tls-private-key-file "$(pki apiserver.key)" \
    --client-ca-file "$(pki ca.crt)" \
    --kubelet-client-certificate "$(pki apiserver-kubelet-client.crt)" \
    --kubelet-client-key "$(pki apiserver-kubelet-client.key)" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$(pki sa.pub)" \
    --service-account-signing-key-file "$(pki sa.key)" \
    --service-cluster-ip-range "${SERVICE_CIDR}" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction,OwnerReferencesPermissionEnforcement \
    --allow-privileged=true \
    --audit-policy-file "${STATE}/audit-policy.yaml" \
    --audit-log-path "${STATE}/audit.log" --audit-log-format json --audit-log-maxsize 200 \
    --audit-log-mode batch --audit-log-batch-max-wait 1s \
    --profiling=false --v 1
  wait_for kube-apiserver 90 apiserver_ready

  start kube-controller-manager "${BIN}/kube-controller-manager" \
    --kubeconfig "${STATE}/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "${STATE}/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "${STATE}/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "${KCM_PORT}" --cert-dir "${STATE}/kcm-certs" \
    --use-service-account-credentials=true \
    --service-account-private-key-file "$(pki sa.key)" --root-ca-file "$(pki ca.crt)" \
    --cluster-signing-cert-file "$(pki ca.crt)" --cluster-signing-key-file "$(pki ca.key)" \
    --service-cluster-ip-range "${SERVICE_CIDR}" --cluster-cidr "${CLUSTER_CIDR}" \
    --allocate-node-cidrs=false --leader-elect=false \
    --horizontal-pod-autoscaler-sync-period 5s \
    --node-monitor-grace-period 40s \
    --profiling=false --v 1
  start kube-scheduler "${BIN}/kube-scheduler" \
    --kubeconfig "${STATE}/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "${STATE}/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "${STATE}/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "${SCHEDULER_PORT}" --cert-dir "${STATE}/scheduler-certs" \
    --leader-elect=false --profiling=false --v 1
  wait_for kube-controller-manager 60 curl -sfk "https://127.0.0.1:${KCM_PORT}/healthz"
  wait_for kube-scheduler 60 curl -sfk "https://127.0.0.1:${SCHEDULER_PORT}/healthz"
  # The default ServiceAccount comes from the controller-manager: namespaces are usable once it is there.
  wait_for kube-controller-manager 60 \
    env KUBECONFIG="${STATE}/kubeconfig" "${BIN}/kubectl" get serviceaccount default -n default
  log "plane up in $((SECONDS - t0)) s (state in ${STATE})"
  printf '%s\n' "${STATE}/kubeconfig"
}

# Processes the test kubelet started and a dead test process left behind: those listed in
# kubelet.pids that still carry the kubelet's marker in their environment (a PID reused by
# another program never does).
stop_pods() {
  local f="${STATE}/kubelet.pids" pid
  [[ -f "${f}" ]] || return 0
  while read -r pid; do
    [[ -n "${pid}" && -r "/proc/${pid}/environ" ]] || continue
    if tr '\0' '\n' <"/proc/${pid}/environ" 2>/dev/null | grep -q '^HELIOS_TEST_KUBELET_POD='; then
      kill -TERM -- "-${pid}" 2>/dev/null || kill -TERM "${pid}" 2>/dev/null || true
    fi
  done <"${f}"
  rm -f "${f}"
}

cmd_down() {
  local b f pid stopped=0
  stop_pods
  if [[ -f "${STATE}/pod-route-added" ]]; then
    ip route del local "${CLUSTER_CIDR}" dev lo table local 2>/dev/null || true
    rm -f "${STATE}/pod-route-added"
  fi
  for b in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    f="$(pidfile "${b}")"
    [[ -f "${f}" ]] || continue
    pid="$(cat "${f}")"
    if kill -0 "${pid}" 2>/dev/null; then
      kill -TERM "${pid}" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.2; done
      kill -0 "${pid}" 2>/dev/null && kill -KILL "${pid}" 2>/dev/null || true
      stopped=$((stopped + 1))
    fi
    rm -f "${f}"
  done
  log "stopped ${stopped} process(es)"
}

cmd_env() {
  printf 'export KUBECONFIG=%q\n' "${STATE}/kubeconfig"
  printf 'export PATH=%q:"$PATH"\n' "${BIN}"
  printf 'export HELIOS_CLUSTER_DIR=%q\n' "${STATE}"
  printf 'export HELIOS_CLUSTER_BIN=%q\n' "${BIN}"
  printf 'export HELIOS_CLUSTER_AUDIT_LOG=%q\n' "${STATE}/audit.log"
}

cmd_status() {
  local b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler; do
    if alive "${b}"; then echo "${b}: running (pid $(cat "$(pidfile "${b}")"))"; else echo "${b}: stopped"; fi
  done
  running
}

case "${1:-}" in
  build) cmd_build ;;
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  node-kubeconfig) cmd_node_kubeconfig "${2:-}" ;;
  bin) printf '%s\n' "${BIN}" ;;
  crds) printf '%s\n' "${CRDS}" ;;
  *) die "usage: $0 build|up|down|env|status|node-kubeconfig NODE|bin|crds" ;;
esac
