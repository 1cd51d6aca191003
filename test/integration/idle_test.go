//go:build linux

package integration

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// Thousands of idle connections held at once all still work, and the
// proxy's memory per idle connection is reported. The counts fit the
// 20,000 open files a process may have here: the sockmap plane holds 2
// descriptors per connection, the splice plane 6; the test process holds
// the client and backend ends, 2 per connection.
func TestManyIdleConnections(t *testing.T) {
	nettest.RequireRoot(t)
	for _, tc := range []struct {
		plane string
		conns int
	}{{"sockmap", 5000}, {"splice", 3000}} {
		t.Run(tc.plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
			// Every connection comes from one address: no per-client cap here.
			p := startProxy(t, topo.Proxy, tc.plane, []backendRow{backendAt("b1", 9000)},
				"EDGEPROXY_CLIENT_MAX_CONNS=0", "EDGEPROXY_ADMIN_ADDR="+adminAddr)
			before := p.rssKiB(t)
			deadline := time.Now().Add(120 * time.Second)
			conns := make([]*net.TCPConn, 0, tc.conns)
			defer func() {
				for _, c := range conns {
					c.Close()
				}
			}()
			for i := range tc.conns {
				if time.Now().After(deadline) {
					t.Fatalf("opened only %d of %d connections in 120s", i, tc.conns)
				}
				c, err := nettest.Dial(topo.Client, proxyAddr, 5*time.Second)
				if err != nil {
					t.Fatalf("connection %d: dial: %v", i, err)
				}
				conns = append(conns, c)
				if got, err := nettest.ReadLine(c, 5*time.Second); err != nil || got != "hello from b1" {
					t.Fatalf("connection %d: greeting %q, %v", i, got, err)
				}
			}
			time.Sleep(200 * time.Millisecond)
			held := p.rssKiB(t)
			t.Logf("%s: %d idle connections: proxy RSS %d KiB before, %d KiB held: %.2f KiB per connection",
				tc.plane, tc.conns, before, held, float64(held-before)/float64(tc.conns))
			// Greeted, then quiet since: on the sockmap plane none is
			// paired, as pairing pays off only for a connection that talks.
			if s, pr := p.mapEntries(t); s != 0 || pr != 0 {
				t.Fatalf("with %d idle connections held: %d sockhash entries and %d pairings, want none", tc.conns, s, pr)
			}
			// The admin endpoint reads counters, not maps: with every
			// connection held it answers, and its counts are exact.
			start := time.Now()
			st := proxyStatus(t, topo.Proxy)
			statusTook := time.Since(start)
			start = time.Now()
			m := scrape(t, topo.Proxy)
			scrapeTook := time.Since(start)
			if st.Active != tc.conns {
				t.Fatalf("/status active = %d with %d connections held", st.Active, tc.conns)
			}
			if got, _ := m.get(`edgeproxy_active_connections{backend="b1"}`); int(got) != tc.conns {
				t.Fatalf("/metrics active connections of b1 = %v with %d held", got, tc.conns)
			}
			t.Logf("%s: with %d connections held, GET /status took %v, GET /metrics %v", tc.plane, tc.conns, statusTook, scrapeTook)
			// Every held connection still carries bytes both ways.
			for i, c := range conns {
				msg := fmt.Sprintf("still alive %d", i)
				if _, err := fmt.Fprintln(c, msg); err != nil {
					t.Fatalf("connection %d: write: %v", i, err)
				}
				if got, err := nettest.ReadLine(c, 5*time.Second); err != nil || got != msg {
					t.Fatalf("connection %d after holding: echo %q, %v", i, got, err)
				}
			}
			if tc.plane == "sockmap" {
				// Each talked once: the tick after its message pairs it.
				waitUntil(t, 5*time.Second, "every connection that talked paired", func() (bool, string) {
					s, pr := p.mapEntries(t)
					return s == 2*tc.conns && pr == 2*tc.conns, fmt.Sprintf("%d sockhash entries and %d pairings, want %d each", s, pr, 2*tc.conns)
				})
				for i, c := range conns[:100] {
					msg := fmt.Sprintf("paired %d", i)
					if _, err := fmt.Fprintln(c, msg); err != nil {
						t.Fatalf("connection %d: write after pairing: %v", i, err)
					}
					if got, err := nettest.ReadLine(c, 5*time.Second); err != nil || got != msg {
						t.Fatalf("connection %d after pairing: echo %q, %v", i, got, err)
					}
				}
			}
			for _, c := range conns {
				c.Close()
			}
			conns = nil
			p.waitNoEntries(t)
		})
	}
}
