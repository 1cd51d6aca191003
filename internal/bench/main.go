// Command bench measures edgeproxy beside a direct path and HAProxy in a
// three-namespace testbed (client, proxy, backend joined by veth).
//
//	go run ./internal/bench run     # as root: build the testbed, measure, write docs/
//	go run ./internal/bench report  # regenerate docs/benchmarks.md and the chart from the JSON
//
// The same binary is re-executed inside the namespaces (through nsenter) as
// the backend server ("serve") and as the load generator ("client").
// scripts/bench.sh is the usual entry point (`sudo make bench`).
package main

import (
	"fmt"
	"os"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage: bench <command> [flags]

commands:
  run      build the netns testbed and measure every contender (root)
  report   regenerate benchmarks.md and bench-chart.svg from bench-results.json
  serve    backend server (run inside the backend namespace)
  client   load generator (run inside the client namespace)

environment for run: BENCH_ROUNDS (5), BENCH_SECS (5), BENCH_PINGS (20000),
BENCH_IDLE_CONNS (3000), BENCH_CONN_WORKERS (32), BENCH_RR_CONNS (50),
BENCH_RR_BYTES (2048), BENCH_SYSCALL_CONNS (2000; 0: no strace phase),
BENCH_WORKLOADS (all: pingpong,pingpong1cpu,bulk1,bulk4,conns,rr2k,idle),
BENCH_CONTENDERS (all: direct,edgeproxy-sockmap,edgeproxy-splice,haproxy),
BENCH_EDGEPROXY_ENV (settings under test). Round-trip diagnostics:
BENCH_PIN=0 (client and backend threads not pinned), BENCH_PING_LEGACY=1
(the Go runtime's syscall path), both as before the round trip was fixed.
`)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "run":
		err = runMain(os.Args[2:])
	case "report":
		err = reportMain(os.Args[2:])
	case "serve":
		err = serveMain(os.Args[2:])
	case "client":
		err = clientMain(os.Args[2:])
	case "-h", "--help", "help":
		usage()
		return
	default:
		usage()
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}
