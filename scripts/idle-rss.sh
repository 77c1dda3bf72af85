#!/usr/bin/env bash
# Measures the edge-gateway's resident memory per idle authenticated TP connection, and
# mosquitto's per idle MQTT client in the same run (its peer: the density comparison).
#   scripts/idle-rss.sh [connections]   (default 10000; BUILD=0 skips the release build,
#   EDGE_LOG sets the edge's RUST_LOG, default info; PEER=0 skips mosquitto)
# Starts its own nats-server and redis-server on free ports, a release edge-gateway, an
# auth responder that takes every token (`bench-fixtures auth`), and `tcpc-load --idle`,
# which connects the devices from loopback source addresses (one process per 19,000:
# the open-files limit) and holds them. Prints the edge's VmRSS before and after, per
# connection, and tcpc-load's report (connected, how long connecting took). Then the
# same for a mosquitto on a free port (`max_queued_messages 0`, as the benchmarks'),
# held by `tcpc-load --protocol mqtt --idle` (clean sessions, the token as user name).
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
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
per() { awk -v a="$2" -v b="$1" -v n="$3" 'BEGIN { printf "%.2f", (a-b)/n }'; }
# tcpc-load holding n idle devices of `$@` from the loopback addresses 127.x.$1.*, in the
# background ($load). Each run's x is new: the ports of the last run from the same
# addresses stay in TIME_WAIT for a minute.
net=127.$((RANDOM % 250 + 1))
hold() {
  local subnet=$1; shift
  "$bin/tcpc-load" --idle --duration 1h --devices "$n" --connect-rate 2000 \
    --source "$net.$subnet.1-$net.$subnet.$((n / 20000 + 1))" --processes "$(((n + 18999) / 19000))" "$@" \
    >"$work/load.out" 2>"$work/load.err" & load=$!; pids+=($load)
}
before=$(rss "$edge")
mkfifo "$work/hold"
"$bin/bench-fixtures" auth --nats-url "nats://127.0.0.1:$nats" <"$work/hold" >"$work/auth.out" & pids+=($!)
exec 3>"$work/hold"
for _ in $(seq 600); do grep -q ready "$work/auth.out" 2>/dev/null && break; sleep 0.1; done
hold 1 --edge "127.0.0.1:$official"
series='edge_connections{listener="official"}'
gauge() { curl -s "http://127.0.0.1:$metrics/metrics" | grep "^$series" | awk '{print $2}'; }
for _ in $(seq 1200); do [ "$(gauge)" = "$n" ] && break; sleep 0.1; done
sleep "${SETTLE:-2}" # let the allocator settle after the auth burst
after=$(rss "$edge")
held=$(gauge)
echo "$series $held"
kill -INT "$load"; wait "$load" || true
cat "$work/load.out"
echo "edge VmRSS: before ${before} KiB, with $held idle connections ${after} KiB"
edge_per=$(per "$before" "$after" "$held")
echo "per connection: $edge_per KiB"
exec 3>&-
[ "${PEER:-1}" = 0 ] && exit 0

mqtt=$(port)
mkdir -m 777 "$work/mosquitto"
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 0\nlog_dest none\n' \
  "$mqtt" >"$work/mosquitto/conf"
(ulimit -n "$(ulimit -Hn)"; exec mosquitto -c "$work/mosquitto/conf") & broker=$!; pids+=($broker)
for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$mqtt") 2>/dev/null && break; sleep 0.1; done
before=$(rss "$broker")
hold 2 --protocol mqtt --edge "127.0.0.1:$mqtt"
for _ in $(seq 1200); do grep -q "connected $n/$n" "$work/load.err" && break; sleep 0.1; done
sleep "${SETTLE:-2}"
after=$(rss "$broker")
kill -INT "$load"; wait "$load" || true
cat "$work/load.out"
echo "mosquitto VmRSS: before ${before} KiB, with $n idle MQTT clients ${after} KiB"
mqtt_per=$(per "$before" "$after" "$n")
echo "per client: $mqtt_per KiB"
awk -v e="$edge_per" -v m="$mqtt_per" 'BEGIN { printf "edge / mosquitto per idle connection: %.2f\n", e/m }'
