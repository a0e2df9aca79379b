#!/usr/bin/env bash
# Autobahn WebSocket conformance (PyPI kosoku) against the echo endpoint, compared with the
# committed expectations: sections 1-11 OK / NON-STRICT / INFORMATIONAL, 12-13 (compression)
# UNIMPLEMENTED. Fails on any regression. kosoku comes from the virtual environment that
# .ci/setup creates under target/venv (system Pythons refuse `pip install`).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash .ci/setup >&2
kosoku=target/venv/bin/kosoku
cargo build --release --quiet --bin customws

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=$(mktemp -d)
target/release/customws --listen "127.0.0.1:$port" --jwt-secret autobahn-only --shards 2 \
  --echo-path /echo --max-message-size 64MiB --send-queue 1024 --send-queue-bytes 64MiB \
  --log-level warn >"$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 100); do
  if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then break; fi
  sleep 0.05
done

# kosoku exits non-zero when any case is not OK (12-13 are UNIMPLEMENTED by design);
# the comparison below is the verdict.
"$kosoku" -m fuzzingclient -p 2 -o "$out" "ws://127.0.0.1:$port/echo" >"$out/kosoku.log" 2>&1 || true
if [ ! -s "$out/index.json" ]; then
  echo "autobahn: kosoku produced no report; its log:" >&2
  tail -20 "$out/kosoku.log" >&2
  exit 1
fi
python3 tests/autobahn/compare.py tests/autobahn/expected.json "$out/index.json"
