#!/usr/bin/env bash
# Runs the topology of compose.yaml as local processes on loopback: two customws nodes (and a
# Redis when the binary has the cluster flags), behind haproxy (or nginx) terminating TLS with
# a self-signed certificate made on the fly. The terminator runs deploy/haproxy.cfg (or
# deploy/nginx.conf) itself, with only the addresses and the certificate path substituted.
# Prints the URLs, then runs until Ctrl-C / SIGTERM and stops everything it started (by PID).
#
# Usage: deploy/local.sh [--terminator haproxy|nginx] [--bin PATH] [--state FILE] [--check]
#        deploy/local.sh --make-cert DIR
#   --bin PATH    the customws binary (default: target/release/customws, then target/debug)
#   --state FILE  once ready, write KEY=VALUE lines (URLs, ports, certificate, secret and key
#                 files, cluster on/off) to FILE
#   --check       validate haproxy.cfg (haproxy -c) and nginx.conf (nginx -t), start the
#                 topology, check /health through the terminator, stop, exit 0 when all passed
#   --make-cert DIR  only write a self-signed certificate for localhost to DIR: cert.pem and
#                 key.pem (nginx), site.pem (both in one file, haproxy); for compose.yaml
# Needs: openssl, curl, python3 (to find free ports), haproxy (or nginx); redis-server with a
# cluster-capable binary. `.ci/setup` installs them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

mode=run
terminator=haproxy
bin=""
state=""
cert_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --check) mode=check ;;
    --terminator) terminator="${2:?--terminator needs haproxy or nginx}"; shift ;;
    --bin) bin="${2:?--bin needs a path}"; shift ;;
    --state) state="${2:?--state needs a file}"; shift ;;
    --make-cert) mode=cert; cert_dir="${2:?--make-cert needs a directory}"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "local.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$terminator" in haproxy | nginx) ;; *) echo "local.sh: --terminator haproxy|nginx" >&2; exit 2 ;; esac

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "local.sh: needs $1 (run .ci/setup, or apt-get install $2)" >&2; exit 1; }
}

# A self-signed certificate for localhost and 127.0.0.1. Not a CA (CA:FALSE): TLS clients that
# trust it as their root (rustls, curl --cacert) accept it as the server's own certificate.
make_cert() {
  need openssl openssl
  mkdir -p "$1"
  cat >"$1/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = localhost
[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
CNF
  openssl req -x509 -config "$1/openssl.cnf" -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -nodes -days 30 -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
  cat "$1/cert.pem" "$1/key.pem" >"$1/site.pem"
  chmod 600 "$1/key.pem" "$1/site.pem"
  rm -f "$1/openssl.cnf"
}

if [ "$mode" = cert ]; then
  make_cert "$cert_dir"
  echo "local.sh: wrote $cert_dir/cert.pem, key.pem, site.pem"
  exit 0
fi

if [ -z "$bin" ]; then
  for candidate in "$root/target/release/customws" "$root/target/debug/customws"; do
    [ -x "$candidate" ] && { bin="$candidate"; break; }
  done
fi
[ -n "$bin" ] && [ -x "$bin" ] || {
  echo "local.sh: no customws binary; build one (cargo build --release --bin customws) or pass --bin" >&2
  exit 1
}
need curl curl
need python3 python3
need "$terminator" "$terminator"
[ "$mode" = check ] && { need haproxy haproxy; need nginx nginx; }

cluster=0
# grep reads all of --help (with -q it could stop early and the binary die of SIGPIPE).
if "$bin" --help 2>/dev/null | grep -- --cluster >/dev/null; then
  need redis-server redis-server
  cluster=1
fi

dir="$(mktemp -d "${TMPDIR:-/tmp}/customws-local.XXXXXX")"
pids=()
names=()
# Stops what this script started, newest first, by PID: SIGTERM, then SIGKILL after 5 s.
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local i pid
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid="${pids[$i]}"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "local.sh: ${names[$i]} ($pid) still running after 5 s, killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ]; then
    for log in "$dir"/*.log; do
      [ -s "$log" ] && { echo "--- $log (last lines)" >&2; tail -n 20 "$log" >&2; }
    done
  fi
  rm -rf "$dir"
  [ -n "$state" ] && rm -f "$state"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a background process: start NAME COMMAND...; its output goes to $dir/NAME.log.
start() {
  local name="$1"
  shift
  "$@" >"$dir/$name.log" 2>&1 &
  pids+=("$!")
  names+=("$name")
}

# Waits (at most 10 s) until curl gets a 2xx from the URL; extra arguments go to curl.
wait_http() {
  local url="$1"
  shift
  for _ in $(seq 100); do
    curl -fsS --max-time 1 "$@" "$url" -o /dev/null 2>/dev/null && return 0
    for i in "${!pids[@]}"; do
      kill -0 "${pids[$i]}" 2>/dev/null || { echo "local.sh: ${names[$i]} exited" >&2; return 1; }
    done
    sleep 0.1
  done
  echo "local.sh: $url not answering after 10 s" >&2
  return 1
}

make_cert "$dir"
openssl rand -hex 32 >"$dir/jwt_secret"
openssl rand -hex 24 >"$dir/api_key"
chmod 600 "$dir/jwt_secret" "$dir/api_key"

# Free loopback ports below the kernel's ephemeral range (where outgoing connections take
# theirs), all chosen at once so that none is handed out twice.
read -r port_tls n1_ws n1_api n2_ws n2_api redis_port < <(python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
ports = []
high = low if low > 12000 else 65536
for port in random.sample(range(10000, high), 2000):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    ports.append(port)
    if len(ports) == 6:
        break
print(*ports)')

cluster_args=()
if [ "$cluster" = 1 ]; then
  start redis redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no
  cluster_args=(--cluster "redis://127.0.0.1:$redis_port")
fi

node_args=(--shards 1 --jwt-secret-file "$dir/jwt_secret" --api-key-file "$dir/api_key"
  --trusted-proxies 127.0.0.1 --shutdown-timeout 2s)
[ "$cluster" = 1 ] && cluster_node=(--node-id node1) || cluster_node=()
start node1 "$bin" --listen "127.0.0.1:$n1_ws" --api-listen "127.0.0.1:$n1_api" "${node_args[@]}" \
  ${cluster_args[@]+"${cluster_args[@]}"} ${cluster_node[@]+"${cluster_node[@]}"}
[ "$cluster" = 1 ] && cluster_node=(--node-id node2)
start node2 "$bin" --listen "127.0.0.1:$n2_ws" --api-listen "127.0.0.1:$n2_api" "${node_args[@]}" \
  ${cluster_args[@]+"${cluster_args[@]}"} ${cluster_node[@]+"${cluster_node[@]}"}

# The shipped configurations with loopback addresses and this run's certificate.
sed -e "s|node1:8082|127.0.0.1:$n1_ws|; s|node2:8082|127.0.0.1:$n2_ws|" \
  -e "s|bind :8443 |bind 127.0.0.1:$port_tls |; s|/etc/haproxy/certs/site.pem|$dir/site.pem|" \
  "$here/haproxy.cfg" >"$dir/haproxy.cfg"
sed -e "s|node1:8082|127.0.0.1:$n1_ws|; s|node2:8082|127.0.0.1:$n2_ws|" \
  -e "s|listen 8443 ssl;|listen 127.0.0.1:$port_tls ssl;|; s|/etc/nginx/certs/|$dir/|" \
  "$here/nginx.conf" >"$dir/nginx.conf"
for file in haproxy.cfg nginx.conf; do
  if grep -nE 'node[12]:|:8443|/etc/(haproxy|nginx)/certs' "$dir/$file" >&2; then
    echo "local.sh: deploy/$file changed; update the substitutions in local.sh" >&2
    exit 1
  fi
done
mkdir -p "$dir/nginx"
if [ "$mode" = check ]; then
  haproxy -c -q -f "$dir/haproxy.cfg" || { echo "local.sh: haproxy -c refused deploy/haproxy.cfg" >&2; exit 1; }
  nginx -q -t -p "$dir/nginx/" -e "$dir/nginx/error.log" -c "$dir/nginx.conf" ||
    { echo "local.sh: nginx -t refused deploy/nginx.conf" >&2; exit 1; }
  echo "local.sh: haproxy -c and nginx -t accept the configurations"
fi

if [ "$terminator" = haproxy ]; then
  start haproxy haproxy -db -f "$dir/haproxy.cfg"
else
  start nginx nginx -p "$dir/nginx/" -e "$dir/nginx/error.log" -c "$dir/nginx.conf" -g "daemon off;"
fi

wait_http "http://127.0.0.1:$n1_ws/health"
wait_http "http://127.0.0.1:$n2_ws/health"
wait_http "https://127.0.0.1:$port_tls/health" --cacert "$dir/cert.pem"

if [ -n "$state" ]; then
  cat >"$state.tmp" <<STATE
TERMINATOR=$terminator
URL=wss://127.0.0.1:$port_tls/ws
HTTPS=127.0.0.1:$port_tls
CA=$dir/cert.pem
JWT_SECRET_FILE=$dir/jwt_secret
API_KEY_FILE=$dir/api_key
NODE1_WS=127.0.0.1:$n1_ws
NODE1_API=127.0.0.1:$n1_api
NODE2_WS=127.0.0.1:$n2_ws
NODE2_API=127.0.0.1:$n2_api
CLUSTER=$cluster
PIDS="${pids[*]}"
STATE
  mv "$state.tmp" "$state"
fi

if [ "$mode" = check ]; then
  # Requests through the terminator go to both nodes in turn (round-robin); each must answer.
  for _ in 1 2 3 4; do
    curl -fsS --max-time 2 --cacert "$dir/cert.pem" "https://127.0.0.1:$port_tls/health" -o /dev/null
  done
  echo "local.sh: check passed ($terminator, cluster=$cluster)"
  exit 0
fi

cat <<INFO
customws, two nodes behind $terminator (cluster: $([ "$cluster" = 1 ] && echo "on, Redis 127.0.0.1:$redis_port" || echo off))
  WebSocket  wss://127.0.0.1:$port_tls/ws   (self-signed: trust $dir/cert.pem)
  health     https://127.0.0.1:$port_tls/health
  node1      ws://127.0.0.1:$n1_ws/ws   API http://127.0.0.1:$n1_api (key in $dir/api_key)
  node2      ws://127.0.0.1:$n2_ws/ws   API http://127.0.0.1:$n2_api
  JWT secret $dir/jwt_secret (HS256)
  logs       $dir/*.log
Ctrl-C stops everything.
INFO

# Run until a signal, or until one of the processes exits (then stop the rest and fail).
# Polled: `wait -n PID…` misses a process that ended before it was called ("no such job")
# and then waits for the others forever.
set +e
while :; do
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "local.sh: ${names[$i]} exited" >&2
      exit 1
    fi
  done
  sleep 0.2 &
  wait $!
done
