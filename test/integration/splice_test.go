//go:build linux

package integration

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// openFDs counts the proxy's open descriptors.
func (p *proxyProc) openFDs(t testing.TB) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("read proxy descriptors: %v", err)
	}
	return len(entries)
}

// TestSpliceIdleConnectionsHoldOnlySockets: on the splice plane an idle
// connection holds its two sockets and no pipe; pipes are lent while bytes
// move and come back after. Each loop may keep a few empty pipes for the
// next burst (idlePipesPerLoop, 8, two descriptors each), whatever the
// number of connections.
func TestSpliceIdleConnectionsHoldOnlySockets(t *testing.T) {
	nettest.RequireRoot(t)
	const (
		conns     = 400
		workers   = 2
		poolFDs   = workers * 8 * 2
		bulkBytes = 16 << 20
	)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	p := startProxy(t, topo.Proxy, "splice", []backendRow{backendAt("b1", 9000)}, adminEnv,
		"EDGEPROXY_CLIENT_MAX_CONNS=0", fmt.Sprintf("EDGEPROXY_WORKERS=%d", workers), "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
	before := p.openFDs(t)

	held := make([]*net.TCPConn, 0, conns)
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	for i := range conns {
		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatalf("connection %d: dial: %v", i, err)
		}
		held = append(held, c)
		if got, err := nettest.ReadLine(c, 2*time.Second); err != nil || got != "hello from b1" {
			t.Fatalf("connection %d: greeting %q, %v", i, got, err)
		}
	}
	idle := p.openFDs(t) - before
	t.Logf("splice: %d idle connections hold %d descriptors (%.2f each)", conns, idle, float64(idle)/conns)
	if idle < 2*conns || idle > 2*conns+poolFDs {
		t.Fatalf("%d idle connections hold %d descriptors, want 2 each (%d) plus at most %d of pooled pipes", conns, idle, 2*conns, poolFDs)
	}

	// One connection moves bytes both ways while the rest stay idle; once
	// it is done its pipes are back in the pool.
	payload := bytes.Repeat([]byte("0123456789abcdef"), bulkBytes/16)
	echo := make(chan error, 1)
	busy := held[0]
	go func() {
		_ = busy.SetWriteDeadline(time.Now().Add(20 * time.Second))
		_, err := busy.Write(payload)
		echo <- err
	}()
	_ = busy.SetReadDeadline(time.Now().Add(20 * time.Second))
	back := make([]byte, len(payload))
	if _, err := io.ReadFull(busy, back); err != nil {
		t.Fatalf("echo of %d MiB through the proxy: %v", bulkBytes>>20, err)
	}
	if err := <-echo; err != nil {
		t.Fatalf("write %d MiB: %v", bulkBytes>>20, err)
	}
	if !bytes.Equal(back, payload) {
		t.Fatalf("the %d MiB echoed back differ from what was sent", bulkBytes>>20)
	}
	after := p.openFDs(t) - before
	t.Logf("splice: after a %d MiB echo on one of them: %d descriptors", bulkBytes>>20, after)
	if after > 2*conns+poolFDs {
		t.Fatalf("after the transfer %d connections hold %d descriptors, want at most %d: pipes not given back", conns, after, 2*conns+poolFDs)
	}

	for _, c := range held {
		c.Close()
	}
	held = nil
	waitActive(t, topo.Proxy, 0, 5*time.Second, "every connection gone")
	if left := p.openFDs(t) - before; left > poolFDs {
		t.Fatalf("%d descriptors more than before any connection once all closed, want at most %d (pooled pipes)", left, poolFDs)
	}
}
