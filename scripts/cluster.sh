#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the end-to-end tests (tests/e2e):
#   etcd + kube-apiserver (TLS, token auth, RBAC) + kube-controller-manager + kube-scheduler, built
#   from go.etcd.io/etcd/server/v3 and k8s.io/kubernetes by the Go module tests/cluster, and kwok
#   (sigs.k8s.io/kwok) playing the kubelets of three fake nodes:
#     glm-gpu-0, glm-gpu-1   nvidia.com/gpu: 8, label nvidia.com/gpu.product, taint nvidia.com/gpu
#     glm-cpu-0              CPU only
#   and a pre-made PersistentVolume (ReadWriteOnce, 100Gi, storage class "standard", the default)
#   so PVCs bind.
#
#   scripts/cluster.sh up      build the binaries (cached under ~/.cache), start everything, wait
#                              until usable; prints KUBECONFIG=... last
#   scripts/cluster.sh down    stop every process started by `up` and delete the state
#   scripts/cluster.sh env     print KUBECONFIG=... (admin credentials) of the running cluster
#   scripts/cluster.sh build   only build (or find) the binaries
#   scripts/cluster.sh restart-apiserver   stop and start kube-apiserver alone (tests)
#
# Everything listens on 127.0.0.1 on ports free at `up` time; state lives in $GLM_CLUSTER_DIR
# (default .cluster/ in the repository), so a second checkout runs its own cluster. `up` on a
# running cluster first takes the old one down; processes are tracked by pid files, never by name.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULE="$ROOT/tests/cluster"
STATE="${GLM_CLUSTER_DIR:-$ROOT/.cluster}"
CACHE="${GLM_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubeglm/cluster}"
# Go build parallelism: linking kube-apiserver takes ~1.5 GiB per job.
GO_BUILD_JOBS="${GLM_GO_BUILD_JOBS:-2}"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
# etcd is the version k8s.io/kubernetes itself requires (3.6): Debian's etcd-server (3.4.23 in
# bookworm) predates the watch progress requests the API server needs for client-go's streaming
# lists, and against it kwok's informers stall and its node leases conflict until nodes go
# NotReady.
PACKAGES=(
  go.etcd.io/etcd/server/v3
  k8s.io/kubernetes/cmd/kube-apiserver
  k8s.io/kubernetes/cmd/kube-controller-manager
  k8s.io/kubernetes/cmd/kube-scheduler
  sigs.k8s.io/kwok/cmd/kwok
)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- binaries ----------------------------------------------------------------------------------

module_version() { # module path -> version required by tests/cluster/go.mod
  awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$MODULE/go.mod"
}

bin_dir() {
  local k8s kwok etcd sum
  k8s="$(module_version k8s.io/kubernetes)"
  kwok="$(module_version sigs.k8s.io/kwok)"
  etcd="$(module_version go.etcd.io/etcd/server/v3)"
  [[ -n "$k8s" && -n "$kwok" && -n "$etcd" ]] || die "cannot read versions from $MODULE/go.mod"
  # go.sum pins every dependency; the Go version and the link flags change the binaries too.
  sum="$(cat "$MODULE/go.mod" "$MODULE/go.sum" <(go env GOVERSION) <(ldflags) | sha256sum | cut -c1-12)"
  echo "$CACHE/kubernetes-$k8s-etcd-$etcd-kwok-$kwok-$sum/bin"
}

# What Kubernetes' own build stamps (hack/lib/version.sh): without it the binaries report
# v0.0.0-master, which clients (helm's kubeVersion check, kubectl's skew warning) refuse.
ldflags() {
  local k8s major minor pkg flags="-s -w"
  k8s="$(module_version k8s.io/kubernetes)"
  major="${k8s#v}"; major="${major%%.*}"
  minor="${k8s#v*.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

build() {
  command -v go >/dev/null || die "go is required to build the control plane (Go 1.26+)"
  local dir
  dir="$(bin_dir)"
  if [[ -f "$dir/.complete" ]]; then
    log "binaries cached in $dir"
    kwok_stages "$dir"
    echo "$dir"
    return
  fi
  log "building ${BINARIES[*]} into $dir (cold: ~15 min on 2 cores)"
  local tmp="$dir.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local start=$SECONDS
  # -trimpath and -s -w: smaller binaries and reproducible build cache keys; nothing is debugged.
  (cd "$MODULE" && GOFLAGS="-mod=readonly -trimpath -buildvcs=false" CGO_ENABLED=0 \
    go build -p "$GO_BUILD_JOBS" -ldflags="$(ldflags)" -o "$tmp/" "${PACKAGES[@]}") \
    || { rm -rf "$tmp"; die "go build failed"; }
  # A main package at a /vN module path is named after the element before it.
  mv "$tmp/server" "$tmp/etcd"
  touch "$tmp/.complete"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  log "built in $((SECONDS - start)) s"
  kwok_stages "$dir"
  echo "$dir"
}

# kwok ships its default lifecycle stages as YAML in its module (kwokctl embeds them; the bare
# kwok binary needs them as --config): nodes initialized and heartbeating with leases, pods
# Ready once scheduled, completed, and deleted. Taken from the pinned module, next to the binary.
kwok_stages() {
  local dir="$1" out="$1/kwok-stages.yaml"
  [[ -f "$out" ]] && return
  local src
  src="$(cd "$MODULE" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
  local f
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
      pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ -f "$src/$f" ]] || die "kwok stage $f not found in $src"
    printf -- '---\n'
    cat "$src/$f"
  done >"$out.tmp"
  mv "$out.tmp" "$out"
}

# ---- prerequisites ----------------------------------------------------------------------------

ensure_packages() {
  local missing=()
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  (( ${#missing[@]} )) || return 0
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
  log "installing ${missing[*]} from Debian"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

kubectl_bin() {
  local k="${KUBECTL:-$ROOT/.tools/bin/kubectl}"
  if [[ ! -x "$k" ]]; then
    "$ROOT/scripts/install-tools.sh" >&2
  fi
  [[ -x "$k" ]] || die "kubectl not found at $k"
  echo "$k"
}

# ---- state -------------------------------------------------------------------------------------

free_ports() { # N -> N distinct free loopback ports, held until all are chosen
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

pki() {
  local dir="$STATE/pki"
  mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=kubeglm-test-ca" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  cat >"$dir/apiserver.ext" <<EXT
subjectAltName = IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage = serverAuth
EXT
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$dir/apiserver.key" -out "$dir/apiserver.csr" 2>/dev/null
  openssl x509 -req -in "$dir/apiserver.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 2 -extfile "$dir/apiserver.ext" -out "$dir/apiserver.crt" 2>/dev/null
  # Service account token signing (TokenRequest: the tests run the operator as its ServiceAccount).
  openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  # Static bearer tokens (--token-auth-file): token,user,uid,"groups".
  local admin kcm sched kwok
  admin="$(openssl rand -hex 24)"; kcm="$(openssl rand -hex 24)"
  sched="$(openssl rand -hex 24)"; kwok="$(openssl rand -hex 24)"
  cat >"$dir/tokens.csv" <<CSV
$admin,kubeglm-admin,uid-admin,"system:masters"
$kcm,system:kube-controller-manager,uid-kcm,"system:masters"
$sched,system:kube-scheduler,uid-scheduler,
$kwok,kwok,uid-kwok,"system:masters"
CSV
  chmod 600 "$dir"/*.key "$dir/tokens.csv"
  kubeconfig admin "$admin"
  kubeconfig controller-manager "$kcm"
  kubeconfig scheduler "$sched"
  kubeconfig kwok "$kwok"
}

kubeconfig() { # NAME TOKEN
  cat >"$STATE/$1.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: kubeglm-test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $STATE/pki/ca.crt
users:
- name: $1
  user:
    token: $2
contexts:
- name: $1@kubeglm-test
  context: {cluster: kubeglm-test, user: $1, namespace: default}
current-context: $1@kubeglm-test
KC
  chmod 600 "$STATE/$1.kubeconfig"
}

# ---- processes ---------------------------------------------------------------------------------

start() { # NAME BINARY ARGS...: started in its own session, pid and command line recorded
  local name="$1"; shift
  printf '%q ' "$@" >"$STATE/run/$name.cmd"
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/run/$name.pid"
}

alive() { # NAME -> whether the process recorded for NAME still runs our binary
  local pidfile="$STATE/run/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  # A recycled pid runs another program: compare with the recorded binary.
  local bin
  bin="$(read -r first _ <"$STATE/run/$1.cmd"; printf '%s' "$first")"
  [[ "$(tr '\0' '\n' <"/proc/$pid/cmdline" | head -n1)" == "$(eval "printf '%s' $bin")" ]]
}

stop() { # NAME: SIGTERM, then SIGKILL after 15 s
  alive "$1" || { rm -f "$STATE/run/$1.pid"; return 0; }
  local pid
  pid="$(cat "$STATE/run/$1.pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$STATE/run/$1.pid"
}

wait_for() { # WHAT SECONDS COMMAND...: poll COMMAND until it succeeds, dying after SECONDS
  local what="$1" deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
      log "timed out waiting for $what; last log lines:"
      tail -n 30 "$STATE"/logs/*.log >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

healthz() { # URL: 200 from a loopback endpoint (self-signed serving certs of kcm/scheduler)
  curl -fsSk --max-time 5 "$1" >/dev/null
}

api_ready() {
  curl -fsS --max-time 5 --cacert "$STATE/pki/ca.crt" \
    -H "Authorization: Bearer $(cut -d, -f1 <(head -n1 "$STATE/pki/tokens.csv"))" \
    "https://127.0.0.1:$API_PORT/readyz" >/dev/null
}

start_apiserver() {
  start kube-apiserver "$BIN/kube-apiserver" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --tls-cert-file="$STATE/pki/apiserver.crt" --tls-private-key-file="$STATE/pki/apiserver.key" \
    --client-ca-file="$STATE/pki/ca.crt" \
    --token-auth-file="$STATE/pki/tokens.csv" \
    --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$STATE/pki/sa.pub" \
    --service-account-signing-key-file="$STATE/pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --endpoint-reconciler-type=none \
    --profiling=false
  wait_for "kube-apiserver on 127.0.0.1:$API_PORT" 180 api_ready
}

up_once() {
  read -r ETCD_PORT ETCD_PEER_PORT API_PORT KCM_PORT SCHED_PORT KWOK_PORT <<<"$(free_ports 6)"
  mkdir -p "$STATE"/{run,logs}
  cat >"$STATE/ports" <<PORTS
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
API_PORT=$API_PORT
KCM_PORT=$KCM_PORT
SCHED_PORT=$SCHED_PORT
KWOK_PORT=$KWOK_PORT
PORTS
  pki
  # No fsync: seconds per write on a busy disk, and the data is thrown away at `down` anyway.
  start etcd "$BIN/etcd" --name=kubeglm --data-dir="$STATE/etcd" --unsafe-no-fsync \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="kubeglm=http://127.0.0.1:$ETCD_PEER_PORT" \
    --quota-backend-bytes=2147483648 --log-level=warn
  wait_for "etcd on 127.0.0.1:$ETCD_PORT" 60 curl -fsS --max-time 5 "http://127.0.0.1:$ETCD_PORT/health" || return 1
  start_apiserver || return 1
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --leader-elect=false \
    --root-ca-file="$STATE/pki/ca.crt" --service-account-private-key-file="$STATE/pki/sa.key" \
    --cluster-signing-cert-file="$STATE/pki/ca.crt" --cluster-signing-key-file="$STATE/pki/ca.key" \
    --use-service-account-credentials=false --profiling=false
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$STATE/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --leader-elect=false --profiling=false
  # kwok plays the kubelet of the nodes annotated kwok.x-k8s.io/node=fake: nodes Ready and
  # heartbeating through kube-node-lease Leases, pods scheduled to them Running and Ready (no
  # container runs).
  start kwok "$BIN/kwok" \
    --config="$BIN/kwok-stages.yaml" \
    --kubeconfig="$STATE/kwok.kubeconfig" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-ip=10.0.0.1 --cidr=10.0.0.1/16 --node-lease-duration-seconds=40 \
    --server-address="127.0.0.1:$KWOK_PORT"
  wait_for "kube-controller-manager" 120 healthz "https://127.0.0.1:$KCM_PORT/healthz" || return 1
  wait_for "kube-scheduler" 120 healthz "https://127.0.0.1:$SCHED_PORT/healthz" || return 1
  wait_for "kwok" 60 curl -fsS --max-time 5 "http://127.0.0.1:$KWOK_PORT/healthz" || return 1
  KUBECONFIG="$STATE/admin.kubeconfig" seed || return 1
}

# Fake nodes, the default StorageClass and PersistentVolumes for the tests' claims.
seed() {
  local k
  k="$(kubectl_bin)"
  "$k" apply -f - >/dev/null <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: Immediate
reclaimPolicy: Retain
YAML
  local node
  for node in glm-gpu-0 glm-gpu-1; do
    node_yaml "$node" 96 1Ti '"nvidia.com/gpu": "8"' \
      '"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"' \
      '[{key: nvidia.com/gpu, value: present, effect: NoSchedule}]' | "$k" apply -f - >/dev/null
  done
  node_yaml glm-cpu-0 32 128Gi '' '' '[]' | "$k" apply -f - >/dev/null
  local i
  for i in 0 1 2 3 4 5; do
    "$k" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: glm-pv-$i
  labels: {kubeglm.io/test-volume: "true"}
spec:
  capacity: {storage: 100Gi}
  accessModes: [ReadWriteOnce, ReadOnlyMany, ReadWriteMany]
  storageClassName: standard
  persistentVolumeReclaimPolicy: Retain
  hostPath: {path: /tmp/kubeglm-pv-$i}
YAML
  done
  wait_for "fake nodes Ready" 120 "$k" wait --for=condition=Ready node --all --timeout=5s
  wait_for "ServiceAccount default/default" 120 "$k" get serviceaccount default -n default
}

node_yaml() { # NAME CPU MEMORY EXTRA_RESOURCES EXTRA_LABELS TAINTS
  cat <<YAML
apiVersion: v1
kind: Node
metadata:
  name: $1
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels: {kubernetes.io/hostname: $1, kubernetes.io/os: linux, kubernetes.io/arch: amd64, type: kwok${5:+, $5}}
spec:
  taints: $6
status:
  allocatable: {cpu: "$2", memory: $3, pods: "110", ephemeral-storage: 1Ti${4:+, $4}}
  capacity: {cpu: "$2", memory: $3, pods: "110", ephemeral-storage: 1Ti${4:+, $4}}
  nodeInfo: {architecture: amd64, operatingSystem: linux, kubeletVersion: fake}
YAML
}

running() {
  [[ -f "$STATE/ports" ]] && alive kube-apiserver
}

up() {
  ensure_packages
  BIN="$(build | tail -n1)"
  [[ -d "$STATE" ]] && down
  local attempt
  for attempt in 1 2 3; do
    local start_s=$SECONDS
    if up_once; then
      echo "$BIN" >"$STATE/bin"
      log "cluster up in $((SECONDS - start_s)) s (state: $STATE)"
      env_line
      return 0
    fi
    # A port taken between choosing and binding, or a slow start: retry on fresh ports.
    log "start attempt $attempt failed; retrying"
    down
  done
  die "the control plane did not start (logs were printed above)"
}

down() {
  if [[ -d "$STATE/run" ]]; then
    local name
    # Reverse start order: nothing reconnects to a component already gone.
    for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
      stop "$name"
    done
  fi
  rm -rf "$STATE"
  log "cluster down"
}

env_line() {
  running || die "no cluster running (scripts/cluster.sh up)"
  echo "KUBECONFIG=$STATE/admin.kubeconfig"
}

restart_apiserver() {
  running || die "no cluster running"
  # shellcheck disable=SC1091
  source "$STATE/ports"
  BIN="$(cat "$STATE/bin")"
  stop kube-apiserver
  log "kube-apiserver stopped"
  start_apiserver || die "kube-apiserver did not come back"
  log "kube-apiserver restarted"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) env_line ;;
  build) build ;;
  restart-apiserver) restart_apiserver ;;
  *) echo "usage: $0 up|down|env|build|restart-apiserver" >&2; exit 2 ;;
esac
