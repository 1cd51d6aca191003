//go:build linux

package integration

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// Several event loops accept at once, yet a backend's hard limit holds
// exactly: 120 clients dial together against hard_limit 25 on a proxy with
// 4 loops (more loops than CPUs, so they interleave), and exactly 25 are
// served while the rest are refused at once.
func TestHardLimitExactAcrossWorkers(t *testing.T) {
	const (
		workers = 4
		hard    = 25
		clients = 120
	)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	row := backendAt("b1", 9000)
	row.Soft, row.Hard = hard, hard
	p := startProxy(t, topo.Proxy, "sockmap", []backendRow{row}, adminEnv, "EDGEPROXY_WORKERS=4", "EDGEPROXY_BINDING_TTL_SECS=0")
	if !strings.Contains(p.logs.String(), "workers=4") {
		t.Fatalf("the start line does not report %d workers:\n%s", workers, p.logs.String())
	}
	for round := range 3 {
		results := make([]attempt, clients)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				results[i] = tryGreeting(topo.Client, "", proxyAddr, 3*time.Second)
			}()
		}
		close(start)
		wg.Wait()
		count := map[outcome]int{}
		for _, a := range results {
			count[a.out]++
		}
		st := proxyStatus(t, topo.Proxy)
		for _, a := range results {
			if a.conn != nil {
				a.conn.Close()
			}
		}
		t.Logf("round %d: %d clients at once, hard limit %d, %d loops: %d greeted, %d refused, %d silent, %d broken; /status active %d",
			round, clients, hard, workers, count[greeted], count[refused], count[silent], count[broken], st.Active)
		if count[greeted] != hard || count[refused] != clients-hard {
			t.Fatalf("round %d: %d served and %d refused, want exactly %d served and %d refused", round, count[greeted], count[refused], hard, clients-hard)
		}
		if st.Active != hard {
			t.Fatalf("round %d: /status active = %d while %d were served", round, st.Active, hard)
		}
		waitUntil(t, 3*time.Second, "every connection gone", func() (bool, string) {
			st := proxyStatus(t, topo.Proxy)
			return st.Active == 0, st.states()
		})
	}
	st := proxyStatus(t, topo.Proxy)
	busy := 0
	for _, n := range st.Accepted {
		if n > 0 {
			busy++
		}
	}
	t.Logf("accepted per loop: %v", st.Accepted)
	if st.Workers != workers || busy < 2 {
		t.Fatalf("/status: %d workers, accepted per loop %v: want %d loops, at least two of them accepting", st.Workers, st.Accepted, workers)
	}
	if got, _ := scrape(t, topo.Proxy).get(`edgeproxy_rejected_connections_total{reason="all_at_hard_limit"}`); int(got) != 3*(clients-hard) {
		t.Fatalf("all_at_hard_limit refusals = %v, want %d", got, 3*(clients-hard))
	}
}
