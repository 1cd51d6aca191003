#!/usr/bin/env bash
# Benchmark edgeproxy (sockmap and splice data planes) beside a direct path
# and HAProxy in a client / proxy / backend network-namespace testbed.
# Writes docs/bench-results.json, docs/benchmarks.md and docs/bench-chart.svg.
#
#   sudo make bench                       # 5 interleaved rounds, 5 s per timed workload
#   sudo BENCH_ROUNDS=1 BENCH_SECS=2 make bench
#
# Environment: BENCH_ROUNDS (5), BENCH_SECS (5), BENCH_PINGS (20000),
# BENCH_IDLE_CONNS (3000), BENCH_CONN_WORKERS (32), BENCH_RR_CONNS (50),
# BENCH_RR_BYTES (2048), BENCH_SYSCALL_CONNS (2000; 0 skips the strace
# phase), BENCH_WORKLOADS
# (pingpong,pingpong1cpu,bulk1,bulk4,conns,rr2k,idle),
# BENCH_CONTENDERS (direct,edgeproxy-sockmap,edgeproxy-splice,haproxy),
# BENCH_EDGEPROXY_ENV (settings under test, e.g. "EDGEPROXY_WORKERS=1"),
# BENCH_KEEP_LOGS=1 keeps the proxies' logs. Diagnostics of the round trip:
# BENCH_PIN=0 leaves the client and backend threads unpinned,
# BENCH_PING_LEGACY=1 makes them use the Go runtime's syscall path (both as
# before the round trip was fixed). Regenerate the report from the JSON
# alone with `go run ./internal/bench report`.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
	echo "bench: must run as root (network namespaces, BPF): sudo make bench" >&2
	exit 1
fi

GO=${GO:-go}
export BENCH_ID=${BENCH_ID:-$$}

tmp=$(mktemp -d /tmp/edgeproxy-bench-run.XXXXXX)
bench_pid=
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [[ -n $bench_pid ]] && kill -0 "$bench_pid" 2>/dev/null; then
		kill -TERM "$bench_pid" 2>/dev/null || true
		# the Go program removes its testbed on SIGTERM; give it time
		for _ in $(seq 1 50); do
			kill -0 "$bench_pid" 2>/dev/null || break
			sleep 0.2
		done
		kill -KILL "$bench_pid" 2>/dev/null || true
	fi
	# Whatever is left of this run's testbed.
	for ns in client proxy backend; do
		if [[ -e /run/netns/epb-$BENCH_ID-$ns ]]; then
			ip netns pids "epb-$BENCH_ID-$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
			ip netns del "epb-$BENCH_ID-$ns" 2>/dev/null || true
		fi
	done
	rm -rf "/sys/fs/bpf/edgeproxy-bench-$BENCH_ID-sockmap" "/sys/fs/bpf/edgeproxy-bench-$BENCH_ID-splice" 2>/dev/null || true
	rm -rf "$tmp"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need_apt=()
if [[ -z ${BENCH_CONTENDERS:-} || ${BENCH_CONTENDERS} == *haproxy* ]]; then
	command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
fi
if [[ -z ${BENCH_CONTENDERS:-} || ${BENCH_CONTENDERS} == *direct* ]]; then
	# the independent check of the direct round trip
	command -v sockperf >/dev/null 2>&1 || need_apt+=(sockperf)
fi
if [[ ${BENCH_SYSCALL_CONNS:-2000} != 0 ]]; then
	command -v strace >/dev/null 2>&1 || need_apt+=(strace)
fi
for tool in ip nsenter sysctl taskset; do
	command -v "$tool" >/dev/null 2>&1 || {
		case $tool in
		ip) need_apt+=(iproute2) ;;
		nsenter | taskset) need_apt+=(util-linux) ;;
		sysctl) need_apt+=(procps) ;;
		esac
	}
done
if ((${#need_apt[@]})); then
	echo "bench: installing ${need_apt[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_apt[@]}" ||
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need_apt[@]}"; }
fi

echo "bench: building edgeproxy" >&2
if grep -q '^build:' Makefile 2>/dev/null; then
	make build
else
	"$GO" build -o bin/edgeproxy ./cmd/edgeproxy
fi
"$GO" build -o "$tmp/bench" ./internal/bench

# Run in the background so the traps above fire on INT/TERM while it runs.
"$tmp/bench" run -edgeproxy bin/edgeproxy -out docs &
bench_pid=$!
set +e
wait "$bench_pid"
rc=$?
set -e
bench_pid=
exit "$rc"
