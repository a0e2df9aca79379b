#!/usr/bin/env bash
# Runs the customws benchmark suite: builds release, starts a fresh server for each loadgen
# scenario (so RSS and CPU start clean), runs the kernel floor, collects one JSON line per run
# in bench-results/DATE.jsonl and prints a Markdown table (also saved as bench-results/DATE.md).
#
#   bash benches/run.sh            # full sizes (a few minutes)
#   QUICK=1 bash benches/run.sh    # small sizes, smoke test
#   bash benches/run.sh --write    # full sizes, then replace the generated section of
#                                  # BENCHMARKS.md (between <!-- run.sh:begin --> and
#                                  # <!-- run.sh:end -->) with the table; WRITE=1 does the same
#   bash benches/run.sh --drivers epoll,io_uring
#                                  # every scenario once per server I/O driver (io_driver), one
#                                  # after the other, rows labelled NAME@DRIVER; DRIVERS=... too
#
# Environment: PORT (default 18082), SRC_IPS (8), TIMEOUT (per loadgen run, s; 120),
# LOG_LEVEL (server log level; default warn so per-connection INFO lines are not measured),
# SERVER_EXTRA (more server flags), ONLY (space-separated run names to run, e.g. "p2p-1 floor"),
# WRITE_PARTIAL=1 (allow --write with QUICK=1 or ONLY, which would replace the full table).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

WRITE=${WRITE:-0}
for arg in "$@"; do
    case "$arg" in
    --write) WRITE=1 ;;
    --drivers=*) DRIVERS=${arg#--drivers=} ;;
    --drivers) WANT_DRIVERS=1 ;;
    -h | --help)
        sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        if [[ "${WANT_DRIVERS:-0}" == 1 ]]; then
            DRIVERS=$arg
            WANT_DRIVERS=0
            continue
        fi
        echo "run.sh: unknown argument $arg (try --help)" >&2
        exit 2
        ;;
    esac
done
# Server I/O drivers to compare (empty: the server's default, rows unlabelled).
IFS=', ' read -r -a DRIVER_LIST <<<"${DRIVERS:-}"
for d in ${DRIVER_LIST[@]+"${DRIVER_LIST[@]}"}; do
    case "$d" in
    epoll | io_uring | auto) ;;
    *)
        echo "run.sh: unknown driver $d (epoll, io_uring or auto)" >&2
        exit 2
        ;;
    esac
done
[[ ${#DRIVER_LIST[@]} -gt 0 ]] || DRIVER_LIST=("")
# The driver of the run in progress (set by run and run_density_multi).
DRIVER=""
BENCH_MD=${BENCH_MD:-BENCHMARKS.md}
MARK_BEGIN='<!-- run.sh:begin -->'
MARK_END='<!-- run.sh:end -->'

PORT=${PORT:-18082}
SRC_IPS=${SRC_IPS:-8}
TIMEOUT=${TIMEOUT:-120}
LOG_LEVEL=${LOG_LEVEL:-warn}
QUICK=${QUICK:-0}
ONLY=${ONLY:-}
SECRET=${SECRET:-bench-secret-$$-$RANDOM}
DATE=$(date -u +%Y-%m-%dT%H-%M-%SZ)
OUT=bench-results/$DATE.jsonl
LOGDIR=bench-results/$DATE-logs
ulimit -n 20000 2>/dev/null || true

log() { echo "[run.sh] $*" >&2; }

# Checks that BENCHMARKS.md has each marker once, begin before end.
check_markers() {
    local b e
    b=$(grep -nxF "$MARK_BEGIN" "$BENCH_MD" 2>/dev/null | cut -d: -f1)
    e=$(grep -nxF "$MARK_END" "$BENCH_MD" 2>/dev/null | cut -d: -f1)
    if [[ ! "$b" =~ ^[0-9]+$ || ! "$e" =~ ^[0-9]+$ || "$b" -ge "$e" ]]; then
        log "$BENCH_MD needs exactly one line '$MARK_BEGIN' followed later by one line '$MARK_END'"
        return 1
    fi
}

if [[ "$WRITE" == 1 ]]; then
    if [[ ("$QUICK" == 1 || -n "$ONLY") && "${WRITE_PARTIAL:-0}" != 1 ]]; then
        log "--write with QUICK=1 or ONLY would replace the full table in $BENCH_MD; set WRITE_PARTIAL=1 to do it anyway"
        exit 2
    fi
    check_markers || exit 2
fi
mkdir -p "$LOGDIR"

# ---- build ------------------------------------------------------------------------------------
log "building release (server, loadgen, floor)"
cargo build --release --bin customws >&2 || { log "cargo build failed"; exit 1; }
bench_exe() { # path of a bench executable; retried, since others may be mid-edit
    local exe="" try
    for try in 1 2 3; do
        exe=$(cargo bench --no-run --bench "$1" --message-format=json 2>>"$LOGDIR/build.err" |
            grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep "/$1-" | tail -1)
        [[ -n "$exe" && -x "$exe" ]] && break
        log "cargo bench --no-run --bench $1 failed (try $try); see $LOGDIR/build.err"
        sleep 20
    done
    echo "$exe"
}
LOADGEN_EXE=$(bench_exe loadgen)
FLOOR_EXE=$(bench_exe floor)
if [[ -z "$LOADGEN_EXE" || -z "$FLOOR_EXE" ]]; then
    log "cargo bench --no-run failed"
    cargo bench --no-run --bench loadgen --bench floor >&2
    exit 1
fi
# Snapshot the binaries: other people may rebuild target/ while this runs.
BIN=$(mktemp -d /tmp/customws-bench.XXXXXX)
cp target/release/customws "$BIN/customws"
cp "$LOADGEN_EXE" "$BIN/loadgen"
cp "$FLOOR_EXE" "$BIN/floor"

SERVER_ARGS=(--listen "127.0.0.1:$PORT" --jwt-secret "$SECRET" --shards 2
    --pong-wait 10m --ping-period 9m --send-queue 4096 --send-queue-bytes 16MiB --rate-limit 0 --rate-limit-bytes 0
    --max-message-size 64KiB --log-level "$LOG_LEVEL")
# shellcheck disable=SC2206
[[ -n "${SERVER_EXTRA:-}" ]] && SERVER_ARGS+=($SERVER_EXTRA)

# More server flags for one run only (set by run_with).
RUN_EXTRA=()

# ---- server lifecycle (only the PID started here is ever signalled) ---------------------------
SERVER_PID=""
stop_server() {
    [[ -n "$SERVER_PID" ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 150); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "server $SERVER_PID did not stop in 15 s; SIGKILL"
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=""
}
cleanup() {
    stop_server
    rm -rf "$BIN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_server() {
    local name=$1
    if curl -s -m 1 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
        log "port $PORT is already in use; set PORT"
        return 1
    fi
    local driver_args=()
    [[ -n "$DRIVER" ]] && driver_args=(--io-driver "$DRIVER")
    "$BIN/customws" "${SERVER_ARGS[@]}" ${RUN_EXTRA[@]+"${RUN_EXTRA[@]}"} ${driver_args[@]+"${driver_args[@]}"} \
        >"$LOGDIR/server-$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do
        if curl -sf -m 1 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
            if [[ -n "$DRIVER" && "$DRIVER" != auto ]] && grep -q "falls back to epoll" "$LOGDIR/server-$name.log"; then
                log "io_driver $DRIVER is not available here:"
                cat "$LOGDIR/server-$name.log" >&2
                stop_server
                return 1
            fi
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server exited at start:"
            cat "$LOGDIR/server-$name.log" >&2
            wait "$SERVER_PID" 2>/dev/null
            SERVER_PID=""
            return 1
        fi
        sleep 0.1
    done
    log "server did not answer /health in 10 s"
    stop_server
    return 1
}

json_str() { # minimal JSON string escaping
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

failure_line() { # name, scenario, message, command [process]
    printf '{"scenario":%s,"run":%s,"ok":false,"problems":[%s],"command":%s,"server_extra":%s,"loadavg":%s%s}\n' \
        "$(json_str "$2")" "$(json_str "$1")" "$(json_str "$3")" "$(json_str "$4")" \
        "$(json_str "${RUN_EXTRA[*]+${RUN_EXTRA[*]}}")" "$(json_str "$(loadavg)")" \
        "${5:+,\"process\":$5}" >>"$OUT"
}

selected() { [[ -z "$ONLY" || " $ONLY " == *" ${1%@*} "* ]]; }

# label NAME: the run's name, with the driver when drivers are compared.
label() { echo "$1${DRIVER:+@$DRIVER}"; }

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# append_result NAME JSONFILE LOAD [PROCESS]: the run's JSON line, tagged with the run name, the
# run's extra server flags, the load average before it and (several processes) the process number.
append_result() {
    local tag
    tag="\"run\":$(json_str "$1"),\"server_extra\":$(json_str "${RUN_EXTRA[*]+${RUN_EXTRA[*]}}"),\"loadavg\":$(json_str "$3"),"
    [[ -n "${4:-}" ]] && tag+="\"process\":$4,"
    sed "s/^{/{$(printf '%s' "$tag" | sed 's/[\/&]/\\&/g')/" "$2" >>"$OUT"
}

# run NAME SCENARIO [loadgen options...]: once per driver of --drivers.
run() {
    for DRIVER in "${DRIVER_LIST[@]}"; do
        run_one "$@"
    done
    DRIVER=""
}

run_one() {
    local name
    name=$(label "$1")
    shift
    selected "$name" || return 0
    local load
    load=$(loadavg)
    log "=== $name: loadgen $* (load average $load)"
    if ! start_server "$name"; then
        failure_line "$name" "$1" "server did not start" "$*"
        return
    fi
    "$BIN/loadgen" "$@" --url "127.0.0.1:$PORT" --server-pid "$SERVER_PID" --secret "$SECRET" \
        --src-ips "$SRC_IPS" --timeout-secs "$TIMEOUT" \
        >"$LOGDIR/$name.json" 2>"$LOGDIR/$name.err"
    local rc=$?
    tail -n 3 "$LOGDIR/$name.err" >&2
    if [[ -s "$LOGDIR/$name.json" ]]; then
        append_result "$name" "$LOGDIR/$name.json" "$load"
    else
        failure_line "$name" "$1" "loadgen exited with $rc: $(tail -n 1 "$LOGDIR/$name.err")" \
            "cargo bench --bench loadgen -- $*"
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "server died during $name; log tail:"
        tail -n 20 "$LOGDIR/server-$name.log" >&2
    fi
    stop_server
}

# run_density_multi NAME NPROC CONNS [loadgen options...]: one server, NPROC density generator
# processes of CONNS connections each at once (disjoint user ids and source addresses), each
# waiting for /health to count all NPROC × CONNS before it measures: the way to pass the
# per-process open-file limit.
run_density_multi() {
    for DRIVER in "${DRIVER_LIST[@]}"; do
        run_density_multi_one "$@"
    done
    DRIVER=""
}

run_density_multi_one() {
    local name nproc=$2 conns=$3
    name=$(label "$1")
    shift 3
    selected "$name" || return 0
    local load total=$((nproc * conns)) k
    load=$(loadavg)
    log "=== $name: $nproc loadgen processes × density --conns $conns (load average $load)"
    if ! start_server "$name"; then
        failure_line "$name" density "server did not start" "$nproc processes × density --conns $conns"
        return
    fi
    local pids=() args=()
    for ((k = 0; k < nproc; k++)); do
        args[k]="density --conns $conns --user-offset $((1 + k * conns)) --src-ip-offset $((k * SRC_IPS)) --expect-total $total $*"
        # shellcheck disable=SC2086
        "$BIN/loadgen" ${args[k]} --url "127.0.0.1:$PORT" --server-pid "$SERVER_PID" --secret "$SECRET" \
            --src-ips "$SRC_IPS" --timeout-secs "$TIMEOUT" \
            >"$LOGDIR/$name-$((k + 1)).json" 2>"$LOGDIR/$name-$((k + 1)).err" &
        pids[k]=$!
    done
    for ((k = 0; k < nproc; k++)); do
        wait "${pids[k]}"
        local rc=$? f="$LOGDIR/$name-$((k + 1))"
        tail -n 2 "$f.err" >&2
        if [[ -s "$f.json" ]]; then
            append_result "$name" "$f.json" "$load" $((k + 1))
        else
            failure_line "$name" density "loadgen exited with $rc: $(tail -n 1 "$f.err")" \
                "cargo bench --bench loadgen -- ${args[k]}" $((k + 1))
        fi
    done
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "server died during $name; log tail:"
        tail -n 20 "$LOGDIR/server-$name.log" >&2
    fi
    stop_server
}

# run_with "EXTRA SERVER FLAGS" NAME SCENARIO [loadgen options...]: run with more server flags.
run_with() {
    read -r -a RUN_EXTRA <<<"$1"
    shift
    run "$@"
    RUN_EXTRA=()
}

# Rooms: rate limits are already off in SERVER_ARGS; no joined/left presence events (5,000 joins
# would otherwise announce 12.5 M of them) and room size unbounded.
ROOM_FLAGS="--room-presence-max-members 0 --max-room-members 1000000"
# The hostile scenario: the default rate limits and send queues (a hostile client within its limits).
HOSTILE_FLAGS="$ROOM_FLAGS --rate-limit 100 --rate-limit-bytes 1MiB --send-queue 256 --send-queue-bytes 1MiB"

# ---- meta -------------------------------------------------------------------------------------
MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
GIT=$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo "+dirty")
MEM=$(awk '/^MemTotal:/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
printf '{"scenario":"meta","date":%s,"nproc":%s,"cpu_model":%s,"mem_total":%s,"kernel":%s,"nofile":%s,"loadavg":%s,"git":%s,"server_command":%s,"quick":%s,"only":%s}\n' \
    "$(json_str "$DATE")" "$(nproc)" "$(json_str "$MODEL")" "$(json_str "$MEM")" "$(json_str "$(uname -r)")" \
    "$(json_str "$(ulimit -n)")" "$(json_str "$(loadavg)")" "$(json_str "$GIT")" \
    "$(json_str "target/release/customws ${SERVER_ARGS[*]//$SECRET/S}")" "$QUICK" "$(json_str "$ONLY${DRIVERS:+ drivers=$DRIVERS}")" >"$OUT"

# ---- scenarios --------------------------------------------------------------------------------
if [[ "$QUICK" == 1 ]]; then
    run density density --conns 2000
    run broadcast-small broadcast --receivers 200 --messages 50 --size 100
    run broadcast-large broadcast --receivers 500 --messages 50 --size 100
    run p2p-1 p2p --pairs 8 --inflight 1 --messages 500
    run p2p-16 p2p --pairs 8 --inflight 16 --messages 2000
    run handshake handshake --conns 1000 --concurrency 64
    run_with "$ROOM_FLAGS" room-small room --members 500 --messages 50 --size 100
    run presence-small presence --watchers 100 --updates 50
    run request-1 request --conns 8 --inflight 1 --messages 500
    run request-16 request --conns 8 --inflight 16 --messages 2000
    run_with "$HOSTILE_FLAGS" hostile-small hostile --members 1000 --secs 3 --quiet-secs 1
    run_density_multi density-2x1000 2 1000
else
    run density density --conns 15000
    # Bursts repeated (--rounds) so that the server CPU spans many 10 ms clock ticks.
    run broadcast-1000 broadcast --receivers 1000 --messages 200 --size 100 --rounds 10
    run broadcast-5000 broadcast --receivers 5000 --messages 200 --size 100 --rounds 3
    run p2p-1 p2p --pairs 64 --inflight 1 --messages 8000
    run p2p-16 p2p --pairs 64 --inflight 16 --messages 20000
    run handshake handshake --conns 5000 --concurrency 64
    # One room of 5,000 members over both shards, one member publishing 200 back-to-back
    # broadcasts per burst; 5 bursts so that the server CPU spans many clock ticks.
    run_with "$ROOM_FLAGS" room-5000 room --members 5000 --messages 200 --size 100 --rounds 5
    # 1,000 watchers of one user; 200 distinct presence_updates written back-to-back per burst.
    run presence-1000 presence --watchers 1000 --updates 200 --size 100 --rounds 10
    # The same paced (one update every 5 ms): about one write per event, little batching.
    run presence-1000-paced presence --watchers 1000 --updates 200 --size 100 --interval-ms 5 --rounds 2
    # generic_request → generic_response round trips (the server's built-in echo), 64 connections.
    run request-1 request --conns 64 --inflight 1 --messages 8000
    run request-16 request --conns 64 --inflight 16 --messages 20000
    # Two generator processes sharing one server, as one would run them to pass the per-process
    # file limit (2 × 15,000 on a host with more files per process; here the server has 20,000
    # too, so 2 × 9,000 = 18,000).
    run_density_multi density-2x9000 2 9000
    # Hardening issue #9: a 10,000-member room, two hostile members repeating room_presence and
    # presence_subscribe of 1,024 users while reconnecting every 0.5 s, within their rate limit;
    # an unrelated P2P pair's latency before and during, and the server's RSS growth.
    run_with "$HOSTILE_FLAGS" hostile-10000 hostile --members 10000 --hostiles 2 --secs 10
fi

if selected floor; then
    FLOOR_LOAD=$(loadavg)
    log "=== floor (load average $FLOOR_LOAD)"
    if [[ "$QUICK" == 1 ]]; then
        "$BIN/floor" --secs 0.3 >"$LOGDIR/floor.json" 2>"$LOGDIR/floor.err"
    else
        "$BIN/floor" >"$LOGDIR/floor.json" 2>"$LOGDIR/floor.err"
    fi
    rc=$?
    if [[ -s "$LOGDIR/floor.json" ]]; then
        append_result floor "$LOGDIR/floor.json" "$FLOOR_LOAD"
    else
        failure_line floor floor "floor exited with $rc: $(tail -n 1 "$LOGDIR/floor.err")" "cargo bench --bench floor"
    fi
fi

printf '{"scenario":"meta_end","loadavg":%s}\n' "$(json_str "$(loadavg)")" >>"$OUT"

log "results: $OUT (logs in $LOGDIR)"
"$BIN/loadgen" report --file "$OUT" | tee "bench-results/$DATE.md"

# ---- BENCHMARKS.md ----------------------------------------------------------------------------
if [[ "$WRITE" == 1 ]]; then
    if [[ ! -s "bench-results/$DATE.md" ]]; then
        log "no report; $BENCH_MD left as it is"
        exit 1
    fi
    check_markers || exit 1
    # Replace only the lines between the markers; the file keeps its inode and permissions.
    TMP_MD=$(mktemp)
    awk -v tf="bench-results/$DATE.md" -v b="$MARK_BEGIN" -v e="$MARK_END" '
        $0 == b { print; print ""; while ((getline l < tf) > 0) print l; print ""; skip = 1; next }
        $0 == e { skip = 0 }
        !skip { print }
    ' "$BENCH_MD" >"$TMP_MD" && cat "$TMP_MD" >"$BENCH_MD"
    rm -f "$TMP_MD"
    log "wrote the generated section of $BENCH_MD (bench-results/$DATE.md)"
fi
