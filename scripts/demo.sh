#!/usr/bin/env bash
# `sudo make demo`: a sample routing.db, three echo backends on
# 127.0.0.1:9001-9003 and edgeproxy on :8080 on the sockmap data plane.
# Try it from another terminal:  nc localhost 8080
set -euo pipefail
cd "$(dirname "$0")/.."
bin=bin/edgeproxy
state=${DEMO_DIR:-/tmp/edgeproxy-demo}
mkdir -p "$state"
db="$state/routing.db"
rm -f "$db"
"$bin" db init --db "$db" --sample

pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
"$bin" echo-backend --listen 127.0.0.1:9001 --id sa-br-1 --region sa & pids+=($!)
"$bin" echo-backend --listen 127.0.0.1:9002 --id us-us-1 --region us & pids+=($!)
"$bin" echo-backend --listen 127.0.0.1:9003 --id eu-fr-1 --region eu & pids+=($!)

dataplane=${EDGEPROXY_DATAPLANE:-sockmap}
echo "demo: edgeproxy on :8080 ($dataplane data plane); try: nc localhost 8080   (Ctrl-C stops the demo)"
EDGEPROXY_DB_PATH="$db" EDGEPROXY_LISTEN_ADDR="${EDGEPROXY_LISTEN_ADDR:-:8080}" \
	EDGEPROXY_DATAPLANE="$dataplane" EDGEPROXY_REGION="${EDGEPROXY_REGION:-sa}" \
	"$bin" run &
pids+=($!)
wait "${pids[-1]}"
