#!/usr/bin/env bash
# Go benchmarks of the routing decision (Pick over 10, 100 and 1,000
# backends, Explain, geo lookups), written to docs/bench-routing.md, which
# the netns benchmark report includes. Medians of BENCH_ROUTING_COUNT runs.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${BENCH_ROUTING_COUNT:-7}
out=$(go test ./routing/ -run '^$' -bench . -benchmem -count "$count")
{
	echo "## Routing decisions (Go benchmarks)"
	echo
	echo "\`go test ./routing/ -run '^\$' -bench . -benchmem -count $count\`, medians; the Rust edgeProxy documents"
	echo "about 100 ns, 1 µs and 10 µs for a decision over 10, 100 and 1,000 backends (target: 2x faster)."
	echo
	echo "| benchmark | ns/op | range of the runs, ns/op | B/op | allocs/op | Rust edgeProxy | speed-up |"
	echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
	echo "$out" | awk '
		/^Benchmark/ {
			name=$1; sub(/-[0-9]+$/, "", name)
			for (i = 3; i <= NF; i++) {
				if ($(i+1) == "ns/op") ns[name] = ns[name] " " $i
				if ($(i+1) == "B/op") bop[name] = $i
				if ($(i+1) == "allocs/op") al[name] = $i
			}
			if (!(name in seen)) { seen[name] = 1; order[++n] = name }
		}
		END {
			rust["BenchmarkPick10"] = 100; rust["BenchmarkPick100"] = 1000; rust["BenchmarkPick1000"] = 10000
			for (k = 1; k <= n; k++) {
				name = order[k]
				m = split(substr(ns[name], 2), v, " ")
				# median: sort numerically
				for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
				med = (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
				r = (name in rust) ? sprintf("%d ns", rust[name]) : "—"
				s = (name in rust) ? sprintf("%.1fx", rust[name] / med) : "—"
				printf "| %s | %.1f | %.1f – %.1f | %s | %s | %s | %s |\n", substr(name, 10), med, v[1], v[m], bop[name], al[name], r, s
			}
		}'
	echo
	echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs."
} > docs/bench-routing.md
cat docs/bench-routing.md
