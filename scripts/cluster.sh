#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, built from Go modules (no containers, no kubelet).
#
#   bash scripts/cluster.sh build   build the binaries once per machine (cached by versions)
#   bash scripts/cluster.sh up      start etcd, kube-apiserver, kube-controller-manager and
#                                   kube-scheduler (or reuse a running plane); prints the admin
#                                   kubeconfig path
#   bash scripts/cluster.sh down    stop every process `up` started, by PID
#   bash scripts/cluster.sh env     print `export` lines (KUBECONFIG, PATH, HELIOS_CLUSTER_*)
#   bash scripts/cluster.sh status  say whether the plane runs and which PIDs it has
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
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}"
CACHE="${HELIOS_CLUSTER_CACHE:-${HOME}/.cache/helios/cluster}/${KEY}"
BIN="${CACHE}/bin"
STATE="${HELIOS_CLUSTER_DIR:-${ROOT}/.helios/cluster}"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm)

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
    CGO_ENABLED=0 nice -n 10 go build -p "${HELIOS_BUILD_JOBS:-2}" -trimpath \
      -ldflags="-s -w ${ldflags}" -o "${out}.tmp" "${pkg}")
  mv "${out}.tmp" "${out}"
}

cmd_build() {
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
  log "built in $((SECONDS - start)) s into ${BIN}"
}

case "${1:-}" in
  build) cmd_build ;;
  *) die "usage: $0 build|up|down|env|status" ;;
esac
