#!/usr/bin/env bash
# Measures the edge-gateway's resident memory per idle authenticated TP connection.
#   scripts/idle-rss.sh [connections]   (default 10000; BUILD=0 skips the release build,
#   EDGE_LOG sets the edge's RUST_LOG, default info)
# Starts its own nats-server and redis-server on free ports, a release edge-gateway, an
# auth responder that takes every token (`bench-fixtures auth`), and `tcpc-load --idle`,
# which connects the devices from loopback source addresses (one process per 19,000:
# the open-files limit) and holds them. Prints the edge's VmRSS before and after, per
# connection, and tcpc-load's report (connected, how long connecting took).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
[ "${BUILD:-1}" = 0 ] || cargo build --release -q -p edge-gateway -p tcpc-load -p tcpc-tests --bin edge-gateway --bin tcpc-load --bin bench-fixtures
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nats=$(port); redis=$(port); official=$(port); custom=$(port); grpc=$(port); metrics=$(port)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
nats-server -a 127.0.0.1 -p "$nats" -js -sd "$work/nats" >/dev/null 2>&1 & pids+=($!)
redis-server --port "$redis" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 & pids+=($!)
env RUST_LOG=${EDGE_LOG:-info} ${EDGE_ENV:-} ${EDGE_WRAP:-} "$bin/edge-gateway" --pod-name rss --nats-url "nats://127.0.0.1:$nats" \
  --redis-url "redis://127.0.0.1:$redis" --official-listen "127.0.0.1:$official" \
  --custom-listen "127.0.0.1:$custom" --grpc-listen "127.0.0.1:$grpc" \
  --metrics-listen "127.0.0.1:$metrics" \
  --max-connections-per-source 0 --auth-rate-per-source 1000000 --auth-burst-per-source 1000000 --ban-after 1000000 \
  >"$work/edge.log" 2>&1 & edge=$!; pids+=($edge)
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$metrics/readyz" >/dev/null 2>&1 && break; sleep 0.1
done
rss() { awk '/VmRSS/ {print $2}' "/proc/$edge/status"; }
before=$(rss)
mkfifo "$work/hold"
"$bin/bench-fixtures" auth --nats-url "nats://127.0.0.1:$nats" <"$work/hold" >"$work/auth.out" & pids+=($!)
exec 3>"$work/hold"
for _ in $(seq 600); do grep -q ready "$work/auth.out" 2>/dev/null && break; sleep 0.1; done
"$bin/tcpc-load" --idle --duration 1h --edge "127.0.0.1:$official" --devices "$n" --connect-rate 2000 \
  --source "127.0.1.1-127.0.1.$((n / 20000 + 1))" --processes "$(((n + 18999) / 19000))" \
  >"$work/load.out" 2>"$work/load.err" & load=$!; pids+=($load)
series='edge_connections{listener="official"}'
gauge() { curl -s "http://127.0.0.1:$metrics/metrics" | grep "^$series" | awk '{print $2}'; }
for _ in $(seq 1200); do [ "$(gauge)" = "$n" ] && break; sleep 0.1; done
sleep "${SETTLE:-2}" # let the allocator settle after the auth burst
after=$(rss)
held=$(gauge)
echo "$series $held"
kill -INT "$load"; wait "$load" || true
cat "$work/load.out"
echo "edge VmRSS: before ${before} KiB, with $held idle connections ${after} KiB"
awk -v a="$after" -v b="$before" -v n="$held" 'BEGIN { printf "per connection: %.2f KiB\n", (a-b)/n }'
exec 3>&-
