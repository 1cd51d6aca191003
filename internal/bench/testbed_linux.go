package main

import "github.com/edgeproxy/edgeproxy/internal/nettest"

// setupNetns builds the testbed with nettest, the tests' own set-up:
// namespaces b.nsC, b.nsP and b.nsB (named after BENCH_ID, so
// scripts/bench.sh can remove what a killed run leaves), joined by two veth
// pairs. On top of what the tests need, the proxy namespace routes between
// its links, for the direct contender.
func (b *bench) setupNetns() error {
	topo, err := nettest.CreateTopology(
		nettest.TopologyNames{Client: b.nsC, Proxy: b.nsP, Backend: b.nsB},
		nettest.TopologyAddrs{Client: clientIP + "/24", ProxyClient: proxyIPC + "/24", ProxyBackend: proxyIPB + "/24", Backend: backendIP + "/24"})
	if err != nil {
		return err
	}
	b.deleteNetns = topo.Delete
	steps := [][]string{
		{"ip", "-n", b.nsC, "route", "add", "default", "via", proxyIPC},
		{"ip", "-n", b.nsB, "route", "add", "default", "via", proxyIPB},
		nsArgv(b.nsP, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"),
	}
	// Connection-rate runs make tens of thousands of connections: widen
	// the ephemeral range and let connect() reuse TIME_WAIT ports, the
	// same for every contender.
	for _, ns := range []string{b.nsC, b.nsP} {
		steps = append(steps,
			nsArgv(ns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"),
			nsArgv(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"))
	}
	for _, s := range steps {
		if _, err := run(b.ctx, s...); err != nil {
			return err
		}
	}
	b.logf("testbed up: %s (%s) <-> %s (%s | %s) <-> %s (%s)", b.nsC, clientIP, b.nsP, proxyIPC, proxyIPB, b.nsB, backendIP)
	return nil
}
