//go:build linux

package integration

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/edgeproxy/edgeproxy/loader"
)

// pinnedFlows counts the flow slots a socket owns in p's pinned flows map.
func pinnedFlows(t *testing.T, p *proxyProc) int {
	t.Helper()
	n, err := loader.CountPinnedFlows(p.PinPath)
	if err != nil {
		t.Fatalf("count pinned flows: %v", err)
	}
	return n
}

// waitNoConnectionEntries waits for the sockhash, the pairings and the
// flows map to hold nothing.
func waitNoConnectionEntries(t *testing.T, p *proxyProc) {
	t.Helper()
	p.waitNoEntries(t)
	waitUntil(t, 3*time.Second, "no flow slot owned", func() (bool, string) {
		n := pinnedFlows(t, p)
		return n == 0, fmt.Sprintf("flows in use: %d", n)
	})
}

func TestCrashAndRestart(t *testing.T) {
	nettest.RequireRoot(t)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
			p := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			counts, wait := runLoad(ctx, topo.Client, 4, 5000, "b1")
			held, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer held.Close()
			time.Sleep(500 * time.Millisecond)
			p.kill()
			cancel()
			wait()
			t.Logf("load until SIGKILL: %s", counts)
			// Started again at once, as the unit's Restart= does: the
			// dead process's lock and pins must not stop it.
			start := time.Now()
			p.start(t, topo.Proxy, []string{"EDGEPROXY_HEALTH_INTERVAL_SECS=0"})
			nettest.MustReach(t, topo.Client, proxyAddr, "b1")
			t.Logf("serving again %s after the restart began", time.Since(start))
			held.Close()
			if plane == "sockmap" {
				waitNoConnectionEntries(t, p)
			}
			// 10,000 connections come and go: nothing stays behind.
			ctx, cancel = context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			counts, wait = runLoad(ctx, topo.Client, 4, 2500, "b1")
			wait()
			t.Logf("after the restart: %s", counts)
			if counts.failures() != 0 || counts.ok.Load() != 10000 {
				t.Fatalf("10,000 connections after a restart: %s", counts)
			}
			if plane == "sockmap" {
				waitNoConnectionEntries(t, p)
			}
		})
	}
}
