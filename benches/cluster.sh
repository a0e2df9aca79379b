#!/usr/bin/env bash
# Cluster benchmarks (issue #11): starts a broker (redis-server or nats-server) on a free loopback
# port and release-built customws nodes joined through it, runs the load generator against them,
# and writes one JSON line per run in bench-results/cluster-DATE.jsonl (logs beside it) plus a
# short summary on stderr. Everything started here is stopped by its PID (on exit too); every
# loadgen run is bounded by TIMEOUT, every wait by a deadline.
#
#   bash benches/cluster.sh                 # all runs below
#   ONLY="single-p2p-1 redis-p2p-1" bash benches/cluster.sh
#
# Runs (names for ONLY):
#   single-p2p-1 single-p2p-16 single-bcast   one node, no broker (the same run's reference)
#   redis-p2p-1 redis-p2p-16 redis-bcast      2 nodes on Redis: P2P senders on node 1,
#   nats-p2p-1  nats-p2p-16  nats-bcast       receivers on node 2; broadcast receivers on both
#   redis-tier                                TIER_NODES nodes × TIER_CONNS connections on one
#                                             Redis, one loadgen process per node, P2P between
#                                             random users on different nodes (loadgen `tier`)
#   nats-tier                                 the same on one nats-server (only when in ONLY)
# Environment: TIMEOUT (per loadgen run, s; 120), SRC_IPS (8), TIER_NODES (6), TIER_CONNS (17000),
# TIER_RATE (P2P messages/s per loadgen process; 200), TIER_SECS (P2P seconds; 10),
# TIER_TIMEOUT (s; 600), SHARDS (per node; 2), LOG_LEVEL (warn).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

TIMEOUT=${TIMEOUT:-120}
SRC_IPS=${SRC_IPS:-8}
TIER_NODES=${TIER_NODES:-6}
TIER_CONNS=${TIER_CONNS:-17000}
TIER_RATE=${TIER_RATE:-200}
TIER_SECS=${TIER_SECS:-10}
TIER_TIMEOUT=${TIER_TIMEOUT:-600}
SHARDS=${SHARDS:-2}
LOG_LEVEL=${LOG_LEVEL:-warn}
ONLY=${ONLY:-}
SECRET=${SECRET:-bench-secret-$$-$RANDOM}
DATE=$(date -u +%Y-%m-%dT%H-%M-%SZ)
OUT=$PWD/bench-results/cluster-$DATE.jsonl
LOGDIR=$PWD/bench-results/cluster-$DATE-logs
ulimit -n 20000 2>/dev/null || true
mkdir -p "$LOGDIR"

log() { echo "[cluster.sh] $*" >&2; }
selected() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for tool in redis-server nats-server python3 jq curl; do
    command -v "$tool" >/dev/null || { log "$tool is missing (bash .ci/setup installs it)"; exit 1; }
done

# ---- build ------------------------------------------------------------------------------------
log "building release (server, loadgen)"
cargo build --release --bin customws >&2 || { log "cargo build failed"; exit 1; }
LOADGEN_EXE=$(cargo bench --no-run --bench loadgen --message-format=json 2>>"$LOGDIR/build.err" |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep "/loadgen-" | tail -1)
[[ -n "$LOADGEN_EXE" && -x "$LOADGEN_EXE" ]] || { log "cargo bench --no-run --bench loadgen failed"; exit 1; }
# Snapshot the binaries: others may rebuild target/ meanwhile.
BIN=$(mktemp -d /tmp/customws-cluster-bench.XXXXXX)
cp target/release/customws "$BIN/customws"
cp "$LOADGEN_EXE" "$BIN/loadgen"

# ---- processes (only PIDs started here are signalled) -----------------------------------------
PIDS=()      # every process started, for the exit trap
NODE_PIDS=() # nodes of the current run
NODE_URLS=()
BROKER_PID=""
BROKER_URL=""

stop_pid() { # pid: TERM, up to 15 s, then KILL
    local pid=$1
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "process $pid did not stop in 15 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
}
stop_all() {
    local pid
    for pid in "${NODE_PIDS[@]}"; do stop_pid "$pid"; done
    [[ -n "$BROKER_PID" ]] && stop_pid "$BROKER_PID"
    NODE_PIDS=()
    NODE_URLS=()
    BROKER_PID=""
    BROKER_URL=""
}
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && stop_pid "$pid"
    done
    rm -rf "$BIN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_broker() { # redis|nats
    local engine=$1 port dir
    dir=$(mktemp -d "$BIN/broker.XXXXXX")
    for _ in 1 2 3; do
        port=$(free_port)
        if [[ $engine == redis ]]; then
            (cd "$dir" && exec redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
                >"$LOGDIR/$RUN-broker.log" 2>&1) &
            BROKER_URL="redis://127.0.0.1:$port"
        else
            nats-server -a 127.0.0.1 -p "$port" >"$LOGDIR/$RUN-broker.log" 2>&1 &
            BROKER_URL="nats://127.0.0.1:$port"
        fi
        BROKER_PID=$!
        PIDS+=("$BROKER_PID")
        for _ in $(seq 50); do
            if [[ $engine == redis ]]; then
                [[ $(redis-cli -p "$port" ping 2>/dev/null) == PONG ]] && return 0
            else
                (exec 3<>"/dev/tcp/127.0.0.1/$port" && head -c 4 <&3 | grep -q INFO) 2>/dev/null && return 0
            fi
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        stop_pid "$BROKER_PID"
    done
    log "$engine did not start"
    return 1
}

start_node() { # name [cluster url]
    local name=$1 cluster=${2:-} port pid args
    for _ in 1 2 3; do
        port=$(free_port)
        args=(--listen "127.0.0.1:$port" --jwt-secret "$SECRET" --shards "$SHARDS"
            --pong-wait 10m --ping-period 9m --send-queue 4096 --send-queue-bytes 16MiB
            --rate-limit 0 --rate-limit-bytes 0 --max-message-size 64KiB --log-level "$LOG_LEVEL")
        [[ -n "$cluster" ]] && args+=(--cluster "$cluster" --node-id "$name" --cluster-prefix "bench$$")
        "$BIN/customws" "${args[@]}" >"$LOGDIR/$RUN-$name.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        for _ in $(seq 150); do
            if curl -sf -m 1 "http://127.0.0.1:$port/health" 2>/dev/null |
                { [[ -z "$cluster" ]] && cat >/dev/null || grep -q '"broker":"up"'; }; then
                NODE_PIDS+=("$pid")
                NODE_URLS+=("127.0.0.1:$port")
                return 0
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        log "node $name did not come up on port $port"
        stop_pid "$pid"
    done
    return 1
}

# Waits until every node's /health counts all N nodes (bounded).
wait_nodes() {
    local n=${#NODE_URLS[@]} u
    for _ in $(seq 100); do
        local ok=1
        for u in "${NODE_URLS[@]}"; do
            [[ $(curl -sf -m 1 "http://$u/health" | jq -r '.cluster.nodes // 0' 2>/dev/null) == "$n" ]] || ok=0
        done
        [[ $ok == 1 ]] && return 0
        sleep 0.1
    done
    log "the nodes do not all see $n nodes"
    return 1
}

# record JSONFILE: appends the loadgen line tagged with run name, load average and topology.
record() {
    local f=$1 extra
    extra=$(jq -nc --arg run "$RUN" --arg load "$LOAD" --arg broker "$BROKER_URL" \
        --arg nodes "${#NODE_URLS[@]}" --arg shards "$SHARDS" --arg proc "${2:-}" \
        '{run:$run, loadavg:$load, broker:$broker, nodes:($nodes|tonumber), shards_per_node:($shards|tonumber)} + (if $proc == "" then {} else {process:($proc|tonumber)} end)')
    if [[ -s "$f" ]] && jq -e . "$f" >/dev/null 2>&1; then
        jq -c --argjson x "$extra" '$x + .' "$f" >>"$OUT"
    else
        jq -nc --argjson x "$extra" --arg err "$(tail -n 5 "${f%.json}.err" 2>/dev/null)" \
            '$x + {ok:false, problems:["loadgen produced no JSON: " + $err]}' >>"$OUT"
    fi
}

# loadgen SCENARIO OPTIONS…: one loadgen against the current nodes (all of them in --urls).
loadgen() {
    local urls pids
    urls=$(IFS=,; echo "${NODE_URLS[*]}")
    pids=$(IFS=,; echo "${NODE_PIDS[*]}")
    local args=("$@" --urls "$urls" --server-pids "$pids" --secret "$SECRET" --src-ips "$SRC_IPS"
        --timeout-secs "$TIMEOUT")
    [[ -n "$BROKER_PID" ]] && args+=(--broker-pid "$BROKER_PID")
    log "=== $RUN: loadgen ${args[*]} (load average $LOAD)"
    timeout -k 10 $((TIMEOUT + 60)) "$BIN/loadgen" "${args[@]}" >"$LOGDIR/$RUN.json" 2>"$LOGDIR/$RUN.err"
    tail -n 2 "$LOGDIR/$RUN.err" >&2
    record "$LOGDIR/$RUN.json"
}

# pair_run NAME ENGINE(single|redis|nats) NODES SCENARIO OPTIONS…
pair_run() {
    RUN=$1
    local engine=$2 n=$3 i
    shift 3
    selected "$RUN" || return 0
    LOAD=$(loadavg)
    if [[ $engine != single ]]; then
        start_broker "$engine" || { stop_all; return; }
    fi
    for i in $(seq "$n"); do
        start_node "n$i" "$BROKER_URL" || { stop_all; return; }
    done
    [[ $engine == single ]] || wait_nodes || { stop_all; return; }
    loadgen "$@"
    stop_all
}

P2P1=(p2p --pairs 64 --inflight 1 --messages 4000)
P2P16=(p2p --pairs 64 --inflight 16 --messages 10000)
BCAST=(broadcast --receivers 1000 --messages 200 --size 100 --rounds 10)

pair_run single-p2p-1 single 1 "${P2P1[@]}"
pair_run redis-p2p-1 redis 2 "${P2P1[@]}"
pair_run single-p2p-16 single 1 "${P2P16[@]}"
pair_run redis-p2p-16 redis 2 "${P2P16[@]}"
pair_run single-bcast single 1 "${BCAST[@]}"
pair_run redis-bcast redis 2 "${BCAST[@]}"
pair_run nats-p2p-1 nats 2 "${P2P1[@]}"
pair_run nats-p2p-16 nats 2 "${P2P16[@]}"
pair_run nats-bcast nats 2 "${BCAST[@]}"

# ---- the tier: TIER_NODES × TIER_CONNS on one Redis (nats-tier: on one nats-server) -------------
for TIER_ENGINE in redis nats; do
RUN=$TIER_ENGINE-tier
# nats-tier only when named in ONLY.
[[ $TIER_ENGINE == nats && " $ONLY " != *" nats-tier "* ]] && continue
if selected "$RUN"; then
    LOAD=$(loadavg)
    ok=1
    start_broker "$TIER_ENGINE" || ok=0
    for i in $(seq "$TIER_NODES"); do
        [[ $ok == 1 ]] && { start_node "n$i" "$BROKER_URL" || ok=0; }
    done
    [[ $ok == 1 ]] && { wait_nodes || ok=0; }
    if [[ $ok == 1 ]]; then
        total=$((TIER_NODES * TIER_CONNS))
        urls=$(IFS=,; echo "${NODE_URLS[*]}")
        LG=()
        for i in $(seq 0 $((TIER_NODES - 1))); do
            args=(tier --conns "$TIER_CONNS" --user-offset $((1 + i * TIER_CONNS)) --total-users "$total"
                --expect-total "$total" --rate "$TIER_RATE" --p2p-secs "$TIER_SECS"
                --url "${NODE_URLS[$i]}" --server-pid "${NODE_PIDS[$i]}" --urls "$urls"
                --src-ips 4 --src-ip-offset $((i * 4)) --secret "$SECRET" --timeout-secs "$TIER_TIMEOUT"
                --broker-pid "$BROKER_PID"
                --expect-wait-secs $((TIER_TIMEOUT - 60)))
            log "=== $RUN process $i: loadgen ${args[*]}"
            timeout -k 10 $((TIER_TIMEOUT + 60)) "$BIN/loadgen" "${args[@]}" \
                >"$LOGDIR/$RUN-$i.json" 2>"$LOGDIR/$RUN-$i.err" &
            LG+=($!)
            PIDS+=($!)
        done
        # Broker and node figures while everyone is connected, sampled each 5 s.
        for _ in $(seq $((TIER_TIMEOUT / 5))); do
            alive=0
            for p in "${LG[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
            [[ $alive == 1 ]] || break
            {
                printf '{"t":%s,"broker_rss_kb":%s,"broker_cpu_ticks":%s,"nodes":[' "$(date +%s)" \
                    "$(awk '/VmRSS/{print $2}' "/proc/$BROKER_PID/status" 2>/dev/null || echo null)" \
                    "$(awk '{print $14+$15}' "/proc/$BROKER_PID/stat" 2>/dev/null || echo null)"
                sep=""
                for j in "${!NODE_PIDS[@]}"; do
                    printf '%s{"rss_kb":%s,"cpu_ticks":%s,"health":%s}' "$sep" \
                        "$(awk '/VmRSS/{print $2}' "/proc/${NODE_PIDS[$j]}/status" 2>/dev/null || echo null)" \
                        "$(awk '{print $14+$15}' "/proc/${NODE_PIDS[$j]}/stat" 2>/dev/null || echo null)" \
                        "$(curl -sf -m 2 "http://${NODE_URLS[$j]}/health" || echo null)"
                    sep=","
                done
                echo ']}'
            } >>"$LOGDIR/$RUN-samples.jsonl"
            sleep 5
        done
        for i in "${!LG[@]}"; do
            wait "${LG[$i]}"
            tail -n 2 "$LOGDIR/$RUN-$i.err" >&2
            record "$LOGDIR/$RUN-$i.json" "$i"
        done
        [[ $TIER_ENGINE == redis ]] && redis-cli -u "$BROKER_URL" info >"$LOGDIR/$RUN-redis-info.txt" 2>&1
    fi
    stop_all
fi
done

# ---- summary ----------------------------------------------------------------------------------
log "results: $OUT (logs in $LOGDIR)"
jq -r '[.run, (.ok|tostring),
    (.server_cpu_us_per_msg // .server_cpu_us_per_delivery // .node_rss_bytes_per_conn // "" | tostring),
    (.cluster.nodes_sched_us_per_msg // .cluster.nodes_sched_us_per_delivery // "" | tostring),
    (.cluster.broker.sched_us_per_msg // .cluster.broker.sched_us_per_publish // "" | tostring),
    ((.problems // []) | join("; "))] | @tsv' "$OUT" >&2
